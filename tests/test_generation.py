"""Generation jobs on a scripted fake teacher: files, counts, labels, resume, policies.

The fake answers arithmetic prompts right, wrong or cut off by the sample's seed, so
every count is known; real vLLM runs are in tests/test_generation_vllm.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fakes import FakeGenerator
from helpers import generated_rows
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.contract.generation import REJECTED_DIR
from labelgen.runner import run_job
from labelgen.spec import JobSpec

PROMPTS = 23


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    with (out / "math.jsonl").open("w") as f:
        for i in range(PROMPTS):
            a, b = 3 + i, 10 + 2 * i
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
        f.write('{"answer": "1"}\n')  # no prompt: rejected as missing_field
        f.write('{"prompt": "1+1="}\n')  # no reference: rejected as no_reference
    return out


def answer_script(tokenizer):
    """Seed mod 3: 0 right, 1 wrong, 2 cut at max_tokens (right answer, unfinished)."""

    def respond(ids, seed, spec):
        prompt = tokenizer.decode(list(ids))
        a, b = (int(x) for x in prompt.split("=")[0].split("+")[-2:])
        kind = seed % 3
        value = a + b if kind != 1 else a + b + 1
        tokens = tokenizer(f" so \\boxed{{{value}}}", add_special_tokens=False)["input_ids"]
        if kind == 2:
            return tokens, "length"
        return [*tokens, tokenizer.eos_token_id], "stop"

    return respond


def gen_spec(teacher_dir, prompt_dir, out, shard_mib=0.01, **generate) -> JobSpec:
    data = {
        "teacher": {"model": str(teacher_dir), "max_model_len": 512},
        "corpus": {"sources": [f"{prompt_dir}/*.jsonl"]},
        "labels": {"k": 4},
        "output": {"url": str(out), "shard_mib": shard_mib, "row_group_mib": shard_mib / 2},
        "generate": {
            "n": 4,
            "chat_template": False,
            "max_tokens": 32,
            "batch_prompts": 5,
            "checks": {"reference": {"field": "answer"}},
            **generate,
        },
    }
    return load_config(JobSpec, data)


def label_rows(url: str) -> list[dict]:
    from helpers import dataset_rows

    return dataset_rows(url)


def test_generation_job_keeps_checked_samples_labels_them_and_counts_every_reason(
    teacher_dir, tokenizer, prompt_dir, tmp_path
):
    spec = gen_spec(teacher_dir, prompt_dir, tmp_path / "out")
    fake = FakeGenerator(4, tokenizer, respond=answer_script(tokenizer))
    manifest = run_job(spec, show_progress=False, teacher_factory=lambda s: fake)

    seeds = [seed for _, seed in fake.requests]
    assert len(seeds) == PROMPTS * 4
    passing = sum(1 for s in seeds if s % 3 == 0)
    # A prompt's right answers are the same text: exact dedup (the default) keeps the first.
    right = len({i // 4 for i, s in enumerate(seeds) if s % 3 == 0})
    stats = manifest.generation["stats"]
    assert stats["prompts"] == PROMPTS and stats["samples"] == PROMPTS * 4
    assert stats["kept"] == right and stats["passed"] == passing
    assert {k: v for k, v in stats["rejected"].items() if v} == {
        "wrong_answer": sum(1 for s in seeds if s % 3 == 1),
        "unfinished": sum(1 for s in seeds if s % 3 == 2),
        "duplicate": passing - right,
    }
    assert manifest.rejected == {"missing_field": 1, "no_reference": 1}

    rows = generated_rows(str(tmp_path / "out"))
    assert len(rows) == right
    assert all(r["reject_reason"] is None and r["checks"]["reference"] for r in rows)
    for row in rows:
        assert row["answer"] == row["reference"]
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
        assert (
            row["messages"][:-1]
            == row["prompt"]
            == [{"role": "user", "content": row["prompt"][0]["content"]}]
        )
    # pass@n per prompt: the prompt's passing samples
    by_prompt: dict[str, int] = {}
    for prompt_id, seed in zip(
        [f"math.jsonl#{i}" for i in range(PROMPTS) for _ in range(4)], seeds, strict=True
    ):
        by_prompt[prompt_id] = by_prompt.get(prompt_id, 0) + (seed % 3 == 0)
    assert {r["prompt_id"]: r["prompt_passed"] for r in rows} == {p: c for p, c in by_prompt.items() if c}
    assert [r["sample"] for r in rows] == [
        next(i % 4 for i, s in enumerate(seeds) if s % 3 == 0 and i // 4 == p)
        for p in sorted({i // 4 for i, s in enumerate(seeds) if s % 3 == 0})
    ]
    assert stats["pass@n"] == pytest.approx(sum(1 for c in by_prompt.values() if c) / PROMPTS, abs=1e-6)

    # Labels: one row per kept sample, prompt + response, only response tokens targets,
    # equal to the teacher's labels of that sequence.
    labels = {r["sample_id"]: r for r in label_rows(str(tmp_path / "out"))}
    assert set(labels) == {r["label_sample_id"] for r in rows}
    for row in rows:
        lab = labels[row["label_sample_id"]]
        ids = row["prompt_ids"] + row["response_ids"]
        assert lab["input_ids"] == ids
        mask = np.array(lab["label_mask"])
        assert mask[: len(row["prompt_ids"]) - 1].sum() == 0 and mask[len(row["prompt_ids"]) - 1 :].all()
        want = fake.label([np.array(ids, np.int32)])[0]
        response = want.target_logprobs[len(row["prompt_ids"]) - 1 :]
        assert row["mean_logprob"] == pytest.approx(float(np.mean(response)), rel=1e-5)  # from the labels
        np.testing.assert_array_equal(np.array(lab["topk_ids"]).reshape(-1, 4), want.topk_ids)
    assert manifest.totals["rows"] == right
    assert read_manifest(str(tmp_path / "out")).generation["totals"]["kept"] == right
    from labelgen.summary import format_report, inspect_dataset

    report = format_report(inspect_dataset(str(tmp_path / "out"), sample_rows=8))
    assert (
        f"generation  {PROMPTS} prompts x n=4: {PROMPTS * 4} samples, {passing} passed, {right} kept"
        in report
    )


def test_a_killed_generation_job_resumes_without_losing_or_repeating_a_sample(
    teacher_dir, tokenizer, prompt_dir, tmp_path
):
    whole = tmp_path / "whole"
    run_job(
        gen_spec(teacher_dir, prompt_dir, whole, shard_mib=0.001),
        show_progress=False,
        teacher_factory=lambda s: FakeGenerator(4, tokenizer, respond=answer_script(tokenizer)),
    )

    class Dies(FakeGenerator):
        def generate(self, prompts, seeds, spec, logprobs=True):
            if len(self.requests) >= 3 * 5 * 4:  # dies in its fourth batch
                raise KeyboardInterrupt("killed")
            return super().generate(prompts, seeds, spec, logprobs)

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_job(
            gen_spec(teacher_dir, prompt_dir, cut, shard_mib=0.001),
            show_progress=False,
            teacher_factory=lambda s: Dies(4, tokenizer, respond=answer_script(tokenizer)),
        )
    assert not (cut / "manifest.json").exists()
    committed = sorted(p.name for p in (cut / "_commits").glob("gen-*.json"))
    assert committed  # some shards were committed before the kill
    again = FakeGenerator(4, tokenizer, respond=answer_script(tokenizer))
    spec = gen_spec(teacher_dir, prompt_dir, cut, shard_mib=0.001)
    run_job(spec, show_progress=False, teacher_factory=lambda s: again)
    # Only the prompts after the last committed shard were asked again, whole.
    first = json.loads((cut / "_commits" / committed[-1]).read_text())["next_prompt"]
    assert len(again.requests) == (PROMPTS - first) * 4
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    assert sorted(generated_rows(str(cut)), key=key) == sorted(generated_rows(str(whole)), key=key)
    assert label_rows(str(cut)) == label_rows(str(whole))


def test_policies_rejected_samples_and_labels_off(teacher_dir, tokenizer, prompt_dir, tmp_path):
    out = tmp_path / "first"
    checks = {"reference": {"field": "answer"}, "dedup": "none"}
    spec = gen_spec(
        teacher_dir, prompt_dir, out, keep="first", keep_rejected=True, labels=False, checks=checks
    )
    fake = FakeGenerator(4, tokenizer, respond=answer_script(tokenizer))
    manifest = run_job(spec, show_progress=False, teacher_factory=lambda s: fake)
    kept, rejected = generated_rows(str(out)), generated_rows(str(out), REJECTED_DIR)
    assert len(kept) + len(rejected) == PROMPTS * 4
    assert len({r["prompt_id"] for r in kept}) == len(kept)  # at most one per prompt
    firsts = {}
    for i, (_, seed) in enumerate(fake.requests):
        if seed % 3 == 0:
            firsts.setdefault(i // 4, i % 4)
    assert sorted(r["sample"] for r in kept) == sorted(firsts.values())
    reasons = {r["reject_reason"] for r in rejected}
    assert reasons == {"wrong_answer", "unfinished", "not_selected"}
    assert all(r["label_sample_id"] is None for r in kept)
    assert manifest.shards == [] and manifest.generation["labels"] is False
    assert not (out / "shards").exists()


def test_labeling_specs_and_generation_specs_go_to_their_own_command(teacher_dir, prompt_dir, tmp_path):
    from helpers import write_spec
    from labelgen.cli import main

    spec = {
        "teacher": {"model": str(teacher_dir)},
        "corpus": {"sources": [f"{prompt_dir}/*.jsonl"]},
        "output": {"url": str(tmp_path / "o")},
    }
    plain = write_spec(tmp_path / "plain.yaml", spec)
    with_gen = write_spec(tmp_path / "gen.yaml", {**spec, "generate": {"n": 2}})
    assert main(["generate", str(plain)]) == 2
    assert main(["run", str(with_gen)]) == 2
    assert main(["validate", str(with_gen)]) == 0


def test_the_generate_section_does_not_change_labeling_specs_hashes(teacher_dir, prompt_dir, tmp_path):
    data = {
        "teacher": {"model": str(teacher_dir)},
        "corpus": {"sources": ["x.jsonl"]},
        "output": {"url": str(tmp_path)},
    }
    plain = load_config(JobSpec, data)
    assert "generate" not in json.dumps(plain.to_dict()) or plain.to_dict()["generate"] is None
    a = load_config(JobSpec, {**data, "generate": {"n": 2}})
    b = load_config(JobSpec, {**data, "generate": {"n": 3}})
    assert len({plain.content_hash(), a.content_hash(), b.content_hash()}) == 3


def test_generation_errors_name_the_field_and_the_fix(teacher_dir, prompt_dir, tmp_path):
    from labelgen.contract.configs import ConfigError

    data = {
        "teacher": {"model": str(teacher_dir), "max_model_len": 64},
        "corpus": {"sources": ["x.jsonl"]},
        "output": {"url": str(tmp_path)},
        "hidden": {"layers": [1]},
        "generate": {"n": 2, "temperature": 0, "max_tokens": 64, "labels": False, "top_p": 0},
    }
    with pytest.raises(ConfigError) as err:
        load_config(JobSpec, data)
    text = str(err.value)
    for expected in (
        "generate.n must be 1 with temperature 0",
        "generate.top_p must be in (0, 1]",
        "generate.labels must be true when hidden.layers",
        "generate.max_tokens (64) must be < teacher.max_model_len - 1 (63)",
    ):
        assert expected in text


def test_a_generation_dataset_publishes_with_every_file_checked(teacher_dir, tokenizer, prompt_dir, tmp_path):
    from labelgen.service.verify import PublishRefused, verify_dataset

    out = tmp_path / "gen"
    spec = gen_spec(teacher_dir, prompt_dir, out, shard_mib=0.001, keep_rejected=True)
    run_job(
        spec,
        show_progress=False,
        teacher_factory=lambda s: FakeGenerator(4, tokenizer, respond=answer_script(tokenizer)),
    )
    verified = verify_dataset(str(out), sample_rows=16)
    kinds: dict[str, int] = {}
    for f in verified.files:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    generations = sorted(p.name for p in (out / "generations").iterdir())
    assert kinds["generation"] == len(generations) == kinds["rejected"] > 1
    assert kinds["shard"] == len(list((out / "shards").iterdir()))
    assert kinds["commit"] == len(list((out / "_commits").glob("*.json")))
    victim = out / "rejected" / generations[-1]
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")
    with pytest.raises(PublishRefused, match=f"rejected/{generations[-1]} has sha256"):
        verify_dataset(str(out), sample_rows=16)
