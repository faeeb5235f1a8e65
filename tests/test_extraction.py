"""On-device extraction conformance: the hook vs vLLM's public path vs transformers.

Integration tier: real vLLM on CPU. The hook job runs with a small
``max_num_batched_tokens`` so prompts are split into chunks and share steps with
other requests (chunked prefill under continuous batching).
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_integration import cli

from helpers import dataset_rows, make_spec, write_spec
from labelgen.contract.dataset import read_manifest

pytestmark = pytest.mark.integration

LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def hook_job(teacher_dir, corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("hook-job")
    spec = make_spec(
        teacher_dir,
        corpus_dir,
        str(work / "labels"),
        teacher={"engine_args": {"enforce_eager": True, "max_num_batched_tokens": 96}},
        labels={"k": 8, "extraction": "hook", "draws": 64},
        hidden={"layers": LAYERS, "every": 8, "dtype": "float32"},
    )
    out = cli("labelgen", "run", str(write_spec(work / "job.yaml", spec)), "--no-progress")
    assert "labeled" in out.stdout, out.stderr[-3000:]
    return work / "labels"


@pytest.fixture(scope="module")
def public_job(teacher_dir, corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("public-job")
    spec = make_spec(teacher_dir, corpus_dir, str(work / "labels"), labels={"k": 8, "extraction": "public"})
    out = cli("labelgen", "run", str(write_spec(work / "job.yaml", spec)), "--no-progress")
    assert "labeled" in out.stdout, out.stderr[-3000:]
    return work / "labels"


def test_hook_labels_equal_the_public_flat_path(hook_job, public_job):
    assert read_manifest(str(hook_job)).teacher["extraction"] == "hook"
    assert read_manifest(str(public_job)).teacher["extraction"] == "public"
    hook, public = dataset_rows(hook_job), dataset_rows(public_job)
    assert [r["sample_id"] for r in hook] == [r["sample_id"] for r in public]
    same_ids = total = 0
    for a, b in zip(hook, public, strict=True):
        assert a["input_ids"] == b["input_ids"] and a["label_mask"] == b["label_mask"]
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a["target_logprobs"], b["target_logprobs"], atol=1e-5, rtol=0)
        same_ids += int(np.sum(np.array(a["topk_ids"]) == np.array(b["topk_ids"])))
        total += len(a["topk_ids"])
    assert same_ids / total > 0.999, f"{same_ids}/{total} ids identical (ties aside)"


def _reference(teacher_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids)[None], output_hidden_states=True)
    return torch.log_softmax(out.logits[0, :-1].double(), -1), [h[0].numpy() for h in out.hidden_states]


def test_hidden_states_match_transformers(hook_job, teacher_dir):
    m = read_manifest(str(hook_job))
    assert m.products["hidden"]["layers"] == LAYERS and m.products["hidden"]["dim"] == 128
    shard = m.shards[-1]
    labels = pq.read_table(hook_job / shard.path).to_pylist()
    hidden = pq.read_table(hook_job / shard.hidden_path).to_pylist()
    for row, hrow in list(zip(labels, hidden, strict=True))[:4]:
        assert (row["sample_id"], row["token_hash"]) == (hrow["sample_id"], hrow["token_hash"])
        positions = np.array(hrow["positions"])
        assert len(positions) >= row["num_tokens"] // 8 and np.all(np.diff(positions) == 8)
        _, states = _reference(teacher_dir, row["input_ids"])
        for layer in LAYERS:
            got = np.frombuffer(hrow[f"layer_{layer}"], "<f4").reshape(len(positions), 128)
            np.testing.assert_allclose(got, states[layer][positions], atol=1e-4, rtol=0)


def test_draws_follow_the_teacher_distribution(hook_job, teacher_dir):
    row = dataset_rows(hook_job)[3]
    t = row["num_tokens"]
    ref, _ = _reference(teacher_dir, row["input_ids"])
    num = np.array(row["draw_num"])
    offsets = np.concatenate([[0], np.cumsum(num)])
    ids, counts = np.array(row["draw_ids"]), np.array(row["draw_counts"])
    assert len(num) == t - 1 and np.all(np.add.reduceat(counts, offsets[:-1]) == 64)
    # The share of draws that hit the teacher's argmax matches its mean probability.
    p = ref.exp().numpy()
    top1 = p.argmax(-1)
    hits = sum(
        counts[offsets[pos] : offsets[pos + 1]][ids[offsets[pos] : offsets[pos + 1]] == top1[pos]].sum()
        for pos in range(t - 1)
    )
    freq = hits / (64 * (t - 1))
    mean_top1 = p.max(-1).mean()
    assert abs(freq - mean_top1) < 0.03, (freq, mean_top1)
