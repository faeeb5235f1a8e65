"""The demo's arithmetic task (examples/arithmetic.py): records, splits, solutions, the checker.

Fast: nothing here trains or runs a model.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "examples" / "arithmetic.py"
_SPEC = importlib.util.spec_from_file_location("arithmetic", _PATH)
arithmetic = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(arithmetic)


def _operands(record: dict) -> tuple[int, int]:
    a, b = record["prompt"].removesuffix("=").split("+")
    return int(a), int(b)


def _pair(record: dict) -> tuple[int, int]:
    a, b = _operands(record)
    return min(a, b), max(a, b)


def test_records_are_deterministic_per_seed_and_differ_across_seeds():
    assert arithmetic.make_records(300, seed=3) == arithmetic.make_records(300, seed=3)
    assert arithmetic.make_records(50, seed=3, split="heldout") == arithmetic.make_records(
        50, seed=3, split="heldout"
    )
    assert arithmetic.make_records(300, seed=3) != arithmetic.make_records(300, seed=4)
    assert arithmetic.make_records(300, seed=3, digits=2) != arithmetic.make_records(300, seed=3)


@pytest.mark.parametrize("digits", [2, 3])
def test_records_have_the_fields_and_are_distinct(digits):
    records = arithmetic.make_records(1000, seed=0, digits=digits)
    assert all(set(r) == {"id", "prompt", "answer", "solution"} for r in records)
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["prompt"] for r in records}) == len(records)
    for r in records:
        assert re.fullmatch(rf"[1-9]\d{{{digits - 1}}}\+[1-9]\d{{{digits - 1}}}=", r["prompt"]), r


@pytest.mark.parametrize("digits", [2, 3])
def test_train_and_heldout_never_share_a_problem_whatever_the_seeds(digits):
    train = [r for seed in (0, 1, 2) for r in arithmetic.make_records(2000, seed=seed, digits=digits)]
    heldout = [
        r
        for seed in (0, 1, 7)
        for r in arithmetic.make_records(200, seed=seed, digits=digits, split="heldout")
    ]
    # a+b and b+a count as one problem: neither order of a held-out pair is trained on
    assert not {_pair(r) for r in train} & {_pair(r) for r in heldout}
    assert all(r["id"].startswith(f"add{digits}-heldout-") for r in heldout)


def test_every_solution_boxes_the_true_sum():
    for digits, train, heldout in ((1, 50, 5), (2, 500, 40), (3, 500, 40), (4, 500, 40)):
        records = arithmetic.make_records(train, seed=5, digits=digits)
        for r in records + arithmetic.make_records(heldout, seed=5, digits=digits, split="heldout"):
            a, b = _operands(r)
            assert r["answer"] == str(a + b)
            assert arithmetic.extract_boxed(r["solution"]) == r["answer"]
            assert arithmetic.check_answer(r["solution"], r["answer"])
            assert r["solution"].count("=") == digits  # one column per digit


def test_solution_shape():
    assert arithmetic.solve(47, 38) == "7+8+0=15 4+3+1=08 \\boxed{85}"
    assert arithmetic.solve(97, 38) == "7+8+0=15 9+3+1=13 \\boxed{135}"
    assert arithmetic.solve(999, 1) == "9+1+0=10 9+0+1=10 9+0+1=10 \\boxed{1000}"


def test_a_slip_forgets_a_carry_and_the_trace_follows_it():
    rng = random.Random(0)
    assert arithmetic.solve(47, 38, slip=1.0, rng=rng) == "7+8+0=15 4+3+0=07 \\boxed{75}"
    assert arithmetic.solve(41, 38, slip=1.0, rng=rng) == arithmetic.solve(41, 38)  # no carry to forget
    slipped = [arithmetic.solve(47, 38, slip=0.4, rng=rng) != arithmetic.solve(47, 38) for _ in range(2000)]
    assert 0.35 < sum(slipped) / len(slipped) < 0.45


def test_check_answer_accepts_the_right_answer_only():
    assert arithmetic.check_answer("7+8+0=15 4+3+1=08 \\boxed{85}", "85")
    assert arithmetic.check_answer("\\boxed{ 85 }", "85")
    assert arithmetic.check_answer("\\boxed{085}", "85")  # compared as integers
    assert arithmetic.check_answer("\\boxed{12} then \\boxed{85}", "85")  # the last box counts
    assert not arithmetic.check_answer("\\boxed{85} then \\boxed{12}", "85")
    assert not arithmetic.check_answer("7+8+0=15 4+3+0=07 \\boxed{75}", "85")
    assert not arithmetic.check_answer("85", "85")  # no box, no answer
    assert not arithmetic.check_answer("\\boxed{8 5}", "85")
    assert not arithmetic.check_answer("\\boxed{}", "85")
    assert not arithmetic.check_answer("\\boxed{85", "85")


def test_asking_for_more_problems_than_a_split_holds_is_an_error():
    with pytest.raises(ValueError, match="heldout problems"):
        arithmetic.make_records(50, seed=0, digits=1, split="heldout")
    with pytest.raises(ValueError, match="split must be"):
        arithmetic.make_records(5, seed=0, split="test")


def test_the_teacher_tokenizer_reads_one_character_per_token(tmp_path):
    from labelgen.testing import build_tokenizer

    records = arithmetic.make_records(200, seed=0)
    texts = [r["prompt"] + r["solution"] for r in records]
    tokenizer = build_tokenizer(tmp_path, texts, vocab_size=arithmetic.TEACHER_RECIPE["vocab_size"])
    rendered = arithmetic._render(tokenizer, records[0]["prompt"], chat=True)
    text = "".join(tokenizer.convert_ids_to_tokens(rendered))
    assert text == f"<|user|>{records[0]['prompt']}<|eos|><|assistant|>"
    reply = records[0]["solution"]
    assert len(tokenizer(reply, add_special_tokens=False)["input_ids"]) == len(reply)
