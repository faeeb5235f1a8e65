"""``labelgen audit``: the tolerance table, the tie rule, the draw test, and audits of a real dataset.

The unit tests run on synthetic labels. The integration tests label one tiny corpus with
the real labeling path (vLLM on CPU, draws and hidden states on), start one vLLM
reference for the module, and audit the genuine dataset and forged copies of it: one
log-prob changed, rows from another teacher, labels shifted by one position (checksums
fixed up, as a forger would), a truncated shard, and a different tokenizer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_spec
from labelgen.audit.compare import compare_row
from labelgen.audit.draws import chi2_sf, pooled_test
from labelgen.audit.reference import RefRow
from labelgen.audit.rows import StoredRow
from labelgen.audit.tolerances import LOGPROB_TOLERANCE, tolerance_for
from labelgen.contract.codecs import get_codec
from labelgen.contract.format import token_hash

SHARD0 = "shards/part-00000-00000.parquet"


# ---- unit: the tolerance table ----------------------------------------------------------------
def test_tolerance_table_follows_the_teacher_dtype_and_the_codec():
    f32 = tolerance_for("float32", "plain", 8)
    assert f32.logprob(np.array([0.0, -10.0])).tolist() == pytest.approx([5e-4, 6e-4])
    assert tolerance_for("float16", "plain", 8).logprob(np.array(-3.0)) == pytest.approx(3e-2)
    assert tolerance_for("torch.bfloat16", "plain", 8).logprob(np.array(-3.0)) == pytest.approx(1.5e-1)
    assert set(LOGPROB_TOLERANCE) == {"float32", "float16", "bfloat16"}
    assert f32.codec_level == 0.0
    v1 = tolerance_for("float32", "compact-v1", 8)
    assert v1.codec_space == "nats" and v1.codec_level == pytest.approx(1.5 / 16)
    v2 = tolerance_for("float32", "compact-v2", 64)
    assert v2.codec_space == "sqrt_p" and 0 < v2.codec_level < 0.02
    assert f32.hidden("bfloat16") > f32.hidden("float16") > f32.hidden("float32") == 1e-3
    with pytest.raises(ValueError, match="teacher dtype 'int8' has no audit tolerance"):
        tolerance_for("int8", "plain", 8)


def _labels(rng, n, vocab, k, scale=3.0):
    logits = rng.standard_normal((n, vocab)) * scale
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-lp, axis=1)
    return order, np.take_along_axis(lp, order, 1), lp


def _stored(ids, lps, target, tokens=None):
    p = ids.shape[0]
    tokens = np.arange(p + 1, dtype=np.int32) if tokens is None else tokens
    return StoredRow(
        SHARD0,
        0,
        "s#0.0",
        tokens,
        ids.astype(np.int32),
        lps.astype(np.float32),
        target.astype(np.float32),
        token_hash(tokens) == token_hash(tokens),
    )


@pytest.mark.parametrize("codec", ["plain", "compact-v1", "compact-v2"])
def test_noise_within_the_dtype_tolerance_passes_each_codec_and_a_changed_value_fails(codec):
    """The stored side goes through the codec exactly as the writer does; the re-scored side
    carries float32-size noise: within bounds. One value moved by 0.5 nats: out of bounds."""
    rng = np.random.default_rng(0)
    k, p = 16, 200
    order, sorted_lps, _ = _labels(rng, p, 300, k + 8)
    ids, lps = order[:, :k], sorted_lps[:, :k]
    c = get_codec(codec)
    table = pa.table(c.encode(ids.astype(np.int32), lps.astype(np.float32), np.array([p])))
    stored_ids, stored_lps = c.decode(table, k)
    target = sorted_lps[:, 0]
    noisy = sorted_lps + rng.uniform(-2e-4, 2e-4, sorted_lps.shape)
    ref = RefRow(order[:, : k + 8], noisy, target + 1e-4)
    tol = tolerance_for("float32", codec, k)
    result = compare_row(_stored(stored_ids, stored_lps, target), ref, tol)
    assert result.failures == [] and result.positions == p
    forged = stored_lps.copy()
    forged[37, 2] += 0.5 if codec != "compact-v2" else 1.5
    result = compare_row(_stored(stored_ids, forged, target), ref, tol)
    assert [(f.check, f.position) for f in result.failures] == [("topk", 37)]


def test_the_tie_rule_accepts_a_swap_at_the_kth_place_only_when_the_values_tie():
    k = 4
    ref_ids = np.array([[10, 11, 12, 13, 14, 15]])
    ref_lps = np.array([[-0.5, -1.0, -2.0, -3.0, -3.0002, -4.0]])
    ref = RefRow(ref_ids, ref_lps, np.array([-1.0]))
    tol = tolerance_for("float32", "plain", k)
    tied = _stored(np.array([[10, 11, 12, 14]]), np.array([[-0.5, -1.0, -2.0, -3.0002]]), np.array([-1.0]))
    assert compare_row(tied, ref, tol).failures == []
    wrong = _stored(np.array([[10, 11, 12, 15]]), np.array([[-0.5, -1.0, -2.0, -4.0]]), np.array([-1.0]))
    (failure,) = compare_row(wrong, ref, tol).failures
    assert failure.check == "topk" and failure.position == 0
    assert "stored top-k id 15 (rank 3) is not the teacher's top-4" in failure.reason
    # an id the reference did not even return, while the returned ranks do not tie: wrong
    unknown = _stored(np.array([[10, 11, 12, 99]]), np.array([[-0.5, -1.0, -2.0, -3.0]]), np.array([-1.0]))
    assert "not the teacher's top-4" in compare_row(unknown, ref, tol).failures[0].reason
    # order among near-equal values does not matter; values are compared id by id
    swapped = _stored(np.array([[10, 11, 13, 12]]), np.array([[-0.5, -1.0, -3.0, -2.0]]), np.array([-1.0]))
    assert compare_row(swapped, ref, tol).failures == []
    target = _stored(np.array([[10, 11, 12, 13]]), np.array([[-0.5, -1.0, -2.0, -3.0]]), np.array([-1.01]))
    (failure,) = compare_row(target, ref, tol).failures
    assert failure.check == "target" and "allowed" in failure.reason


# ---- unit: the draw test ----------------------------------------------------------------------
def test_chi2_survival_function_matches_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(100.0, 10) == pytest.approx(2.7693957224e-16, rel=1e-6)
    assert chi2_sf(0.0, 3) == 1.0


def _draw_positions(rng, probs, n, bias=None):
    """(P, C) counts of n draws per position from ``probs`` (or from ``bias`` of them)."""
    source = probs if bias is None else bias
    return np.stack([rng.multinomial(n, p / p.sum()) for p in source]).astype(float)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_draw_test_passes_a_correct_sampler_and_fails_a_biased_one(seed):
    rng = np.random.default_rng(seed)
    _, sorted_lps, _ = _labels(rng, 400, 200, 200, scale=2.0)
    p = np.exp(sorted_lps)
    # classes: ranks 0..7, ranks 8..15, the rest (as draw_classes forms them)
    probs = np.concatenate([p[:, :8], p[:, 8:16].sum(1, keepdims=True), p[:, 16:].sum(1, keepdims=True)], 1)
    fair = pooled_test(_draw_positions(rng, probs, 32), probs, 32)
    assert fair.p_value > 1e-6 and fair.df == 9
    hot = np.exp(sorted_lps / 1.15)
    hot /= hot.sum(1, keepdims=True)
    biased_probs = np.concatenate(
        [hot[:, :8], hot[:, 8:16].sum(1, keepdims=True), hot[:, 16:].sum(1, keepdims=True)], 1
    )
    biased = pooled_test(_draw_positions(rng, probs, 32, biased_probs), probs, 32)
    assert biased.p_value < 1e-6, biased


def test_a_draw_where_the_teacher_puts_no_mass_fails_outright():
    probs = np.array([[0.5, 0.5, 0.0]] * 10)
    observed = np.array([[2.0, 1.0, 1.0]] * 10)
    test = pooled_test(observed, probs, 4)
    assert test.p_value == 0.0 and "no probability" in test.reason


# ---- integration: one tiny dataset, one reference, real audits ------------------------------------
@pytest.fixture(scope="module")
def audit_world(tmp_path_factory, texts):
    """A random-init tiny Llama teacher (peaked: large init range), its tokenizer, a second
    teacher with other weights, and the corpus labeled by `labelgen run`'s path in-process."""
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec
    from labelgen.testing import build_llama, build_tokenizer, write_jsonl_corpus

    work = tmp_path_factory.mktemp("audit")
    tok = build_tokenizer(work / "teacher", texts, vocab_size=512)
    common = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, initializer_range=0.3)
    build_llama(work / "teacher", tok, extra_vocab=16, seed=0, **common)
    build_llama(work / "other", tok, extra_vocab=16, seed=1, **common)
    write_jsonl_corpus(work / "corpus" / "a.jsonl", texts[:30], chat_every=5)
    spec_dict = {
        "teacher": {
            "model": str(work / "teacher"),
            "dtype": "float32",
            "max_model_len": 256,
            "batch_sequences": 16,
            "engine_args": {"enforce_eager": True},
        },
        "corpus": {"sources": [str(work / "corpus" / "*.jsonl")], "messages_field": "messages"},
        "packing": {"seq_len": 96},
        "labels": {"k": 8, "draws": 32},
        # every: 1, so that a short packed sequence still gets hidden samples.
        "hidden": {"layers": [0, 1, 2], "every": 1, "dtype": "bfloat16"},
        "output": {"url": str(work / "labels"), "shard_mib": 0.05, "row_group_mib": 0.02},
    }
    spec_path = write_spec(work / "job.yaml", spec_dict)
    manifest = run_job(load_config(JobSpec, spec_dict), show_progress=False)
    assert len(manifest.shards) >= 2, manifest.totals
    return {"work": work, "url": str(work / "labels"), "manifest": manifest, "spec": spec_path}


@pytest.fixture(scope="module")
def vllm_reference(audit_world):
    from labelgen.audit.reference import VllmReference
    from labelgen.audit.run import dataset_spec

    manifest = audit_world["manifest"]
    spec_text = (Path(audit_world["url"]) / "job-spec.yaml").read_text()
    spec, problem = dataset_spec(manifest, spec_text, audit_world["url"])
    assert problem is None
    reference = VllmReference(spec, manifest.tokenizer["model_vocab_size"])
    yield reference
    reference.close()


def _copy(audit_world, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(audit_world["url"], out)
    return out


def _forge(root: Path, shard_path: str, change) -> None:
    """Rewrite a label shard with ``change(table) -> table`` (same row groups), and fix its size
    and sha256 in the manifest and its commit record, as a forger would."""
    import hashlib

    from labelgen.contract.codecs import DEFAULT_CODEC
    from labelgen.writer import parquet_write_options

    path = root / shard_path
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
    table = change(parquet.read())
    parquet.close()
    with pq.ParquetWriter(path, table.schema, **parquet_write_options(3, DEFAULT_CODEC)) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
    data = path.read_bytes()
    fixed = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["path"] == shard_path:
            shard.update(fixed)
    (root / "manifest.json").write_text(json.dumps(manifest))
    record_path = root / "_commits" / (Path(shard_path).stem + ".json")
    record = json.loads(record_path.read_text())
    record.update(fixed)
    record_path.write_text(json.dumps(record))


def _with_column(table: pa.Table, name: str, fn) -> pa.Table:
    """``table`` with list column ``name``'s flat values replaced by ``fn(values, offsets)``."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = fn(column.flatten().to_numpy().copy(), offsets)
    array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values).cast(column.type.value_type))
    return table.set_column(
        table.schema.get_field_index(name), table.schema.field(name), array.cast(column.type)
    )


def _audit(url, reference, **options):
    from labelgen.audit.run import AuditOptions, run_audit

    return run_audit(
        str(url), AuditOptions(progress=False, **{"rows": None, "seed": 7, **options}), reference=reference
    )


def _where(report) -> tuple:
    f = report["first_failure"]
    return f["check"], f["shard"], f["row"], f["position"]


@pytest.mark.integration
@pytest.mark.timeout(600)  # the first one starts two vLLM engines (labeling, reference)
def test_a_genuine_dataset_passes_with_the_vllm_reference(audit_world, vllm_reference):
    report = _audit(audit_world["url"], vllm_reference, rows=64)
    assert report["passed"], report["summary"]
    assert report["first_failure"] is None and report["positions"] > 0 and report["seed"] == 7
    assert report["reference"] == "vllm" and report["dtype"] == "float32"
    checks = report["checks"]
    assert all(c["passed"] for c in checks.values()), report["summary"]
    assert not checks["draws"].get("skipped") and checks["draws"]["p_value"] >= 1e-6
    assert not checks["hidden"].get("skipped") and report["worst"]["hidden"] < 1e-2
    assert report["worst"]["topk_logprob"] < 1e-4, report["worst"]
    print(report["summary"])


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_genuine_dataset_passes_with_the_transformers_reference(audit_world):
    from labelgen.audit.reference import TransformersReference

    manifest = audit_world["manifest"]
    reference = TransformersReference(manifest.teacher["model"], manifest.k + 8, 1.0, (0, 1, 2))
    report = _audit(audit_world["url"], reference, rows=24)
    assert report["passed"], report["summary"]
    assert report["checks"]["draws"]["p_value"] >= 1e-6 and report["worst"]["topk_logprob"] < 1e-4


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_one_changed_logprob_fails_naming_its_row_and_position(audit_world, vllm_reference, tmp_path):
    root = _copy(audit_world, tmp_path)
    k, row, position = 8, 3, 11

    def change(table):
        def bump(values, offsets):
            values[offsets[row] + position * k + 2] += 0.01
            return values

        return _with_column(table, "topk_logprobs", bump)

    _forge(root, SHARD0, change)
    report = _audit(root, vllm_reference)
    assert not report["passed"] and report["checks"]["integrity"]["passed"]
    assert _where(report) == ("topk", SHARD0, row, position)
    assert "(rank 2)" in report["first_failure"]["reason"] and "allowed" in report["first_failure"]["reason"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_rows_from_a_different_teacher_fail(audit_world, vllm_reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    root = _copy(audit_world, tmp_path)
    other = AutoModelForCausalLM.from_pretrained(
        str(audit_world["work"] / "other"), dtype=torch.float32
    ).eval()

    def change(table):
        ids_all, lps_all, targets = [], [], []
        for tokens in table.column("input_ids").to_pylist():
            with torch.no_grad():
                lp = torch.log_softmax(other(input_ids=torch.tensor([tokens])).logits[0, :-1].double(), -1)
            values, ids = lp.topk(8, dim=-1)
            ids_all.append(ids.reshape(-1).numpy())
            lps_all.append(values.reshape(-1).numpy())
            targets.append(lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy())
        table = _with_column(table, "topk_ids", lambda v, o: np.concatenate(ids_all))
        table = _with_column(table, "topk_logprobs", lambda v, o: np.concatenate(lps_all))
        return _with_column(table, "target_logprobs", lambda v, o: np.concatenate(targets))

    _forge(root, SHARD0, change)
    report = _audit(root, vllm_reference)
    assert not report["passed"] and report["checks"]["integrity"]["passed"]
    assert _where(report) == ("topk", SHARD0, 0, 0), report["first_failure"]
    assert not report["checks"]["target"]["passed"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_labels_shifted_by_one_position_fail(audit_world, vllm_reference, tmp_path):
    root = _copy(audit_world, tmp_path)

    def shift(width):
        def roll(values, offsets):
            out = values.copy()
            for a, b in zip(offsets[:-1], offsets[1:], strict=True):
                out[a : b - width] = values[a + width : b]  # position t holds position t+1's labels
            return out

        return roll

    def change(table):
        table = _with_column(table, "topk_ids", shift(8))
        table = _with_column(table, "topk_logprobs", shift(8))
        return _with_column(table, "target_logprobs", shift(1))

    _forge(root, SHARD0, change)
    report = _audit(root, vllm_reference)
    assert not report["passed"]
    assert _where(report) == ("topk", SHARD0, 0, 0), report["first_failure"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_truncated_shard_fails_the_file_check_naming_it(audit_world, vllm_reference, tmp_path):
    root = _copy(audit_world, tmp_path)
    last = audit_world["manifest"].shards[-1].path
    data = (root / last).read_bytes()
    (root / last).write_bytes(data[: len(data) // 2])
    report = _audit(root, vllm_reference, rows=16)
    assert not report["passed"]
    check, shard, row, position = _where(report)
    assert (check, shard, row, position) == ("integrity", last, None, None)
    assert "truncated or replaced" in report["first_failure"]["reason"]
    assert report["positions"] > 0, "the other shards are still re-scored"
    assert all(s["shard"] != last for s in report["sampled"])


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_different_tokenizer_fails(audit_world, vllm_reference, tmp_path, texts):
    from labelgen.testing import build_tokenizer

    moved = tmp_path / "teacher-other-tokenizer"
    moved.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (audit_world["work"] / "teacher" / name).exists():
            shutil.copy(audit_world["work"] / "teacher" / name, moved / name)
    build_tokenizer(moved, texts[::-1][:80], vocab_size=400)
    report = _audit(audit_world["url"], vllm_reference, rows=8, model=str(moved))
    assert not report["passed"]
    assert report["checks"]["teacher"]["passed"], "same weights: the fingerprint matches"
    assert report["first_failure"]["check"] == "tokenizer"
    assert "another tokenizer's" in report["first_failure"]["reason"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_cli_writes_the_report_and_exits_by_the_result(audit_world, tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "labelgen.cli", "audit", *args, "--no-progress"],
            capture_output=True,
            text=True,
        )

    # transformers re-scores in this process: the vLLM path is the same code the tests above run
    args = (
        "--rows",
        "16",
        "--seed",
        "3",
        "--reference",
        "transformers",
        "--report",
        str(tmp_path / "r.json"),
    )
    ok = cli(audit_world["url"], *args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["seed"] == 3 and len(report["sampled"]) == 16
    assert report["reference"] == "transformers"
    assert (tmp_path / "r.txt").read_text().startswith("audit PASSED")
    root = _copy(audit_world, tmp_path)

    def change(table):
        return _with_column(table, "target_logprobs", lambda v, o: v - 0.05)

    _forge(root, SHARD0, change)
    bad = cli(str(root), "--rows", "all", "--reference", "transformers")
    assert bad.returncode == 1 and "audit FAILED" in bad.stdout and "first failure: target" in bad.stdout
    refused = cli(str(tmp_path / "nothing-here"))
    assert refused.returncode == 2 and "has no manifest.json" in refused.stderr
    attest = cli(audit_world["url"], "--attest")
    assert attest.returncode == 2 and "--attest needs a catalog version" in attest.stderr
