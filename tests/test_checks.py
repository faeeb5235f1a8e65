"""Sample verification for ``labelgen generate``: answers, checks, dedup, keep policies, stats."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from labelgen.checks import (
    REJECTION_REASONS,
    RESULT_KEYS,
    Checker,
    CheckError,
    GenerationStats,
    Sample,
    Verdict,
    answers_match,
    extract_answer,
    normalise,
    parse_number,
    prompt_summary,
    similarity,
)
from labelgen.contract.configs import ConfigError, load_config
from labelgen.spec import GenerateSpec

HERE = __name__  # "test_checks" under pytest (tests/ is on sys.path); user functions live here

# --- user functions the specs below name as f"{HERE}:..." ---------------------------

CALLS: list[int] = []


def says_yes(sample):
    return True


def says_no(sample):
    return False


def says_numpy(sample):
    return np.bool_(sample.index % 2 == 0)


def says_why(sample):
    return (False, "too polite") if "please" in sample.response else (True, "fine")


def says_maybe(sample):
    return "maybe"


def says_list(sample):
    return [False, "lists are not tuples"]


def says_number_reason(sample):
    return (False, 3)


def breaks(sample):
    raise RuntimeError("checker exploded")


def counts_calls(sample):
    CALLS.append(sample.index)
    return True


def two_args(sample, extra):
    return True


def length_score(sample):
    return len(sample.response)


def numpy_score(sample):
    return np.float32(-sample.index)


def nan_score(sample):
    return float("nan")


def text_score(sample):
    return "high"


def bool_score(sample):
    return True


def broken_score(sample):
    raise KeyError("missing")


class Holder:
    @staticmethod
    def check(sample):
        return sample.response != "no"


NOT_CALLABLE = 42


# --- helpers -------------------------------------------------------------------------


def checker(keep: str = "all", score: str = "mean_logprob", **checks) -> Checker:
    return Checker(load_config(GenerateSpec, {"keep": keep, "score": score, "checks": checks}))


def sample(index: int = 0, response: str = "the answer is \\boxed{4}", **kw) -> Sample:
    fields = {
        "prompt_id": "p0",
        "prompt": [{"role": "user", "content": "2+2?"}],
        "token_ids": (1, 2, 3, 4),
        "finish_reason": "stop",
        "mean_logprob": -0.5,
        "reference": "4",
    }
    fields.update(kw)
    return Sample(index=index, response=response, **fields)


def judge_one(check: Checker, s: Sample) -> Verdict:
    (verdict,) = check.judge([s])
    return verdict


def reasons(verdicts: list[Verdict]) -> list[str | None]:
    return [v.reason for v in verdicts]


REFERENCE = {"reference": {"extract": "boxed"}}

# --- extract_answer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{4}.", "4"),
        ("\\boxed{1} first, then \\boxed{ 2 }", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{x^{2} + {y}}", "x^{2} + {y}"),
        ("\\fbox{x}", "x"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("\\boxed{unclosed", None),
        ("\\boxed{ok} then \\boxed{bad {", None),
        ("\\boxed{}", None),
        ("no box here: 4", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_answer(text, "boxed") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("there are 1,234,567 apples", "1,234,567"),
        ("1,234.5 then 7", "7"),
        ("the answer is -3.", "-3"),
        ("x = \u22127", "\u22127"),
        ("(-3)", "-3"),
        ("5-3=2", "2"),
        ("x-3", "3"),
        ("pi is 3.14", "3.14"),
        ("tiny: 1.5e-3", "1.5e-3"),
        ("huge 2E10", "2E10"),
        ("so -3/4 of it", "-3/4"),
        ("a list 1,2,3", "3"),
        ("no numbers at all", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_answer(text, "last_number") == expected


def test_extract_regex_with_and_without_groups():
    text = "Answer: 3\nthinking again\nAnswer: 5 \n"
    assert extract_answer(text, "regex", r"Answer:\s*(\S+)") == "5"
    assert extract_answer(text, "regex", r"Answer:\s*\S+") == "Answer: 5"
    assert extract_answer(text, "regex", r"Final: (\d+)") is None
    assert extract_answer("x", "regex", r"(a)?x") is None  # group 1 did not take part


def test_extract_as_is_and_bad_modes():
    assert extract_answer("  42 \n", "as_is") == "42"
    assert extract_answer("   ", "as_is") is None
    with pytest.raises(ValueError, match="needs a pattern"):
        extract_answer("x", "regex")
    with pytest.raises(ValueError, match="'guess'"):
        extract_answer("x", "guess")


# --- parse_number and answers_match -------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,234", Fraction(1234)),
        ("-3.5", Fraction(-7, 2)),
        ("0.1", Fraction(1, 10)),
        ("+2", Fraction(2)),
        ("\u22127", Fraction(-7)),
        ("1e3", Fraction(1000)),
        ("1.5E-2", Fraction(3, 200)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("-\\dfrac{3}{6}", Fraction(-1, 2)),
        ("50%", Fraction(50)),  # the number as written, not 0.5
        ("50\\%", Fraction(50)),
        ("$12", Fraction(12)),
        ("-$5", Fraction(-5)),
        ("$\\frac{3}{4}$", Fraction(3, 4)),
        ("42.", Fraction(42)),
        ("abc", None),
        ("1,2", None),
        ("12 cm", None),
        ("1/0", None),
        ("", None),
        ("inf", None),
        ("nan", None),
        ("1e5000", None),
    ],
)
def test_parse_number(text, expected):
    value = parse_number(text)
    assert value == expected
    if expected is not None:
        assert isinstance(value, Fraction)


def test_parse_number_huge_exponent_is_a_float():
    assert parse_number("1e-5000") == 0.0
    assert isinstance(parse_number("1e-5000"), float)


@pytest.mark.parametrize(
    "answer, reference, rel_tol, abs_tol, expected",
    [
        ("0.5", "1/2", 0, 0, True),
        ("1,000", "1000", 0, 0, True),
        ("\\frac{1}{4}", "0.25", 0, 0, True),
        ("50%", "50", 0, 0, True),
        ("100.00001", "100", 1e-6, 0, True),  # within rel_tol
        ("100.00001", "100", 1e-9, 1e-9, False),
        ("0.0000001", "0", 1e-6, 0, False),  # rel_tol alone is no help near zero
        ("0.0000001", "0", 1e-6, 1e-6, True),  # ...abs_tol is
        ("1/3", "0.3333", 1e-6, 1e-9, False),
        ("1e400", "1.0000001e400", 1e-6, 0, True),  # exact arithmetic past float range
        ("1e400", "2.5", 1e-6, 1e-9, False),
        ("  The Answer. ", "the answer", 0, 0, True),
        ("$x^2$", "x^2", 0, 0, True),
        ("\\text{Blue}", "blue", 0, 0, True),
        ("5 \\text{ cm}", "5  cm", 0, 0, True),
        ("red", "blue", 0, 0, False),
        ("1,2", "1, 2", 0, 0, False),
        ("5", "five", 0, 0, False),
    ],
)
def test_answers_match(answer, reference, rel_tol, abs_tol, expected):
    assert answers_match(answer, reference, rel_tol, abs_tol) is expected
    assert answers_match(reference, answer, rel_tol, abs_tol) is expected


# --- normalise and similarity --------------------------------------------------------


def test_normalise_collapses_whitespace_only():
    assert normalise("  a  b\n\tc ") == "a b c"
    assert normalise("A b") != normalise("a b")


def test_similarity():
    assert similarity("a b c d", "a b c d") == 1.0
    assert similarity("a b c d", "a b c e") == pytest.approx(1 / 3)  # {abc, bcd} vs {abc, bce}
    assert similarity("a b c d", "w x y z") == 0.0
    assert similarity("a b", "b a") == 1.0  # short texts: word sets
    assert similarity("a b", "a b c") == pytest.approx(2 / 3)
    assert similarity("", "") == 1.0
    assert similarity("", "a") == 0.0


# --- the checks, one reason at a time ------------------------------------------------

# (checks, the sample that must get the reason, the sample that must pass)
REASON_CASES = {
    "unfinished": ({}, sample(finish_reason="length"), sample(finish_reason="stop")),
    "too_short": ({"min_tokens": 4}, sample(token_ids=(1, 2, 3)), sample(token_ids=(1, 2, 3, 4))),
    "too_long": ({"max_tokens": 4}, sample(token_ids=(1, 2, 3, 4, 5)), sample(token_ids=(1, 2, 3, 4))),
    "format": (
        {"format": r"<think>.+</think>.*"},
        sample(response="no thinking \\boxed{4}"),
        sample(response="<think>\nstep\nstep\n</think>\n\\boxed{4}"),  # DOTALL: newlines inside
    ),
    "no_answer": (REFERENCE, sample(response="it is 4"), sample(response="\\boxed{4}")),
    "wrong_answer": (REFERENCE, sample(response="\\boxed{5}"), sample(response="\\boxed{4.0}")),
    "user": ({"user": f"{HERE}:says_why"}, sample(response="please \\boxed{4}"), sample()),
}


@pytest.mark.parametrize("reason", sorted(REASON_CASES))
def test_each_check_rejects_with_its_reason_and_passes_the_good_sample(reason):
    checks, bad, good = REASON_CASES[reason]
    check = checker(**checks)
    rejected = judge_one(check, bad)
    assert (rejected.reason, rejected.passed, rejected.kept) == (reason, False, False)
    accepted = judge_one(check, good)
    assert (accepted.reason, accepted.passed, accepted.kept) == (None, True, True)
    assert all(value is not False for value in accepted.results.values())


def test_checks_that_are_off_do_not_reject():
    check = checker(finished=False, min_tokens=0, dedup="none")
    verdict = judge_one(check, sample(finish_reason="length", token_ids=(), response=""))
    assert (verdict.reason, verdict.kept) == (None, True)
    assert verdict.results == dict.fromkeys(RESULT_KEYS)


def test_results_of_a_default_spec():
    verdict = judge_one(checker(), sample())
    assert list(verdict.results) == list(RESULT_KEYS)
    assert verdict.results == {
        "finished": True,
        "length": True,
        "format": None,
        "reference": None,
        "user": None,
        "unique": True,
    }
    assert (verdict.answer, verdict.detail, verdict.score) == (None, None, None)


def test_every_reason_is_produced_and_listed():
    produced = {judge_one(checker(**checks), bad).reason for checks, bad, _ in REASON_CASES.values()}
    dup = checker().judge([sample(0), sample(1)])
    dropped = checker(keep="first").judge([sample(0, "\\boxed{4}"), sample(1, "also \\boxed{4}")])
    produced |= {dup[1].reason, dropped[1].reason}
    assert produced == set(REJECTION_REASONS)


def test_first_failing_check_is_the_reason_and_later_checks_do_not_run():
    CALLS.clear()
    check = checker(min_tokens=2, format=r".*\\boxed\{.*\}.*", user=f"{HERE}:counts_calls", **REFERENCE)
    unfinished_and_wrong = sample(finish_reason="length", response="\\boxed{5}")
    short_and_unformatted = sample(token_ids=(1,), response="4")
    unformatted_and_wrong = sample(response="5")
    wrong_answer = sample(response="\\boxed{5}")
    verdicts = [judge_one(check, s) for s in (unfinished_and_wrong, short_and_unformatted)]
    verdicts += [judge_one(check, s) for s in (unformatted_and_wrong, wrong_answer)]
    assert reasons(verdicts) == ["unfinished", "too_short", "format", "wrong_answer"]
    assert verdicts[0].results == {**dict.fromkeys(RESULT_KEYS), "finished": False}
    assert verdicts[0].answer is None  # the reference check was not reached
    assert verdicts[3].results["reference"] is False and verdicts[3].results["user"] is None
    assert verdicts[3].answer == "5"
    assert CALLS == []  # the user check never ran


def test_reference_extract_and_missing_reference():
    check = checker(reference={"extract": "last_number", "reference_extract": "last_number"})
    ok = judge_one(check, sample(response="so it is 1,234.", reference="2 + 1232 = 1234"))
    assert (ok.reason, ok.answer, ok.results["reference"]) == (None, "1,234", True)
    missing = judge_one(check, sample(response="1234", reference=None))
    assert (missing.reason, missing.answer) == ("wrong_answer", "1234")
    unusable = judge_one(check, sample(response="1234", reference="no number"))
    assert unusable.reason == "wrong_answer"


def test_reference_regex_pattern_is_used_for_both_sides():
    check = checker(reference={"extract": "regex", "reference_extract": "regex", "pattern": r"####\s*(\S+)"})
    assert judge_one(check, sample(response="work\n#### 72", reference="steps #### 72")).reason is None
    assert judge_one(check, sample(response="work\n#### 70", reference="steps #### 72")).reason == (
        "wrong_answer"
    )
    assert judge_one(check, sample(response="72", reference="#### 72")).reason == "no_answer"


# --- the user check ------------------------------------------------------------------


def test_user_check_bool_tuple_and_numpy():
    assert judge_one(checker(user=f"{HERE}:says_yes"), sample()).reason is None
    no = judge_one(checker(user=f"{HERE}:says_no"), sample())
    assert (no.reason, no.detail, no.results["user"]) == ("user", None, False)
    why = checker(user=f"{HERE}:says_why").judge([sample(0, "please \\boxed{4}"), sample(1)])
    assert [(v.reason, v.detail) for v in why] == [("user", "too polite"), (None, "fine")]
    numpy = checker(user=f"{HERE}:says_numpy").judge([sample(0, "a"), sample(1, "b")])
    assert reasons(numpy) == [None, "user"]
    dotted = checker(user=f"{HERE}:Holder.check").judge([sample(0, "no"), sample(1, "yes")])
    assert reasons(dotted) == ["user", None]


@pytest.mark.parametrize("name", ["says_maybe", "says_list", "says_number_reason"])
def test_user_check_returning_a_bad_value_raises(name):
    check = checker(user=f"{HERE}:{name}")
    with pytest.raises(CheckError) as info:
        check.judge([sample(0, prompt_id="q7"), sample(3, prompt_id="q7")])
    message = str(info.value)
    assert f"{HERE}:{name}" in message and "'q7' sample 0" in message and "must return a bool" in message


def test_user_check_that_raises_is_chained():
    with pytest.raises(CheckError, match=r"'p0' sample 2 raised RuntimeError: checker exploded") as info:
        checker(user=f"{HERE}:breaks").judge([sample(2)])
    assert isinstance(info.value.__cause__, RuntimeError)


# --- importing user functions --------------------------------------------------------


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_xyz:check", "cannot import 'no_such_module_xyz:check'.*PYTHONPATH"),
        (f"{HERE}:no_such_function", "has no attribute 'no_such_function'.*says_yes"),
        (f"{HERE}:Holder.nope", f"'{HERE}.Holder' has no attribute 'nope'"),
        (f"{HERE}:NOT_CALLABLE", "is a int, not a function"),
        (f"{HERE}:two_args", "must take one argument"),
    ],
)
@pytest.mark.parametrize("where", ["generate.checks.user", "generate.score"])
def test_import_failures_name_the_spec_field(path, message, where):
    spec = {"keep": "best_of_n", "score": path} if where == "generate.score" else {"checks": {"user": path}}
    with pytest.raises(CheckError, match=f"^{where}: .*{message}"):
        Checker(load_config(GenerateSpec, spec))


def test_constructor_built_spec_with_a_bad_regex_raises_check_error():
    from labelgen.spec import ChecksSpec

    with pytest.raises(CheckError, match=r"generate\.checks\.format: '\(' is not a valid"):
        Checker(GenerateSpec(checks=ChecksSpec(format="(")))


# --- dedup ---------------------------------------------------------------------------

LONG = "first we add the two numbers then we check the sum twice so the answer is \\boxed{4}"


def test_dedup_exact_ignores_whitespace_and_only_counts_passing_samples():
    samples = [
        sample(0, "\\boxed{4}", finish_reason="length"),  # fails, so it cannot make 1 a duplicate
        sample(1, "\\boxed{4}"),
        sample(2, "  \\boxed{4}\n"),
        sample(3, "The \\boxed{4}"),
    ]
    verdicts = checker().judge(samples)
    assert reasons(verdicts) == ["unfinished", None, "duplicate", None]
    assert [v.results["unique"] for v in verdicts] == [None, True, False, True]
    assert [(v.passed, v.kept) for v in verdicts] == [
        (False, False),
        (True, True),
        (True, False),
        (True, True),
    ]


def test_dedup_near_uses_the_threshold():
    near = LONG.replace("twice", "again")
    assert 0.6 < similarity(LONG, near) < 0.9
    loose = checker(dedup="near", near_threshold=0.6).judge([sample(0, LONG), sample(1, near)])
    assert reasons(loose) == [None, "duplicate"]
    strict = checker(dedup="near", near_threshold=0.9).judge([sample(0, LONG), sample(1, near)])
    assert reasons(strict) == [None, None]
    exact = checker(dedup="exact").judge([sample(0, LONG), sample(1, near)])
    assert reasons(exact) == [None, None]


def test_dedup_none_keeps_repeats():
    verdicts = checker(dedup="none").judge([sample(0), sample(1)])
    assert reasons(verdicts) == [None, None]
    assert [v.results["unique"] for v in verdicts] == [None, None]


# --- keep policies -------------------------------------------------------------------


def distinct(logprobs: list[float], **kw) -> list[Sample]:
    return [sample(i, f"take {i}: \\boxed{{4}}", mean_logprob=lp, **kw) for i, lp in enumerate(logprobs)]


def test_keep_all_and_first():
    samples = [sample(0, "\\boxed{4}", finish_reason="length"), *distinct([-1.0, -2.0, -3.0])[1:]]
    assert reasons(checker(keep="all").judge(samples)) == ["unfinished", None, None]
    first = checker(keep="first").judge(samples)
    assert reasons(first) == ["unfinished", None, "not_selected"]
    assert [v.passed for v in first] == [False, True, True]
    assert [v.score for v in first] == [None, None, None]


def test_keep_best_of_n_by_mean_logprob_ties_to_lower_index():
    verdicts = checker(keep="best_of_n").judge(distinct([-2.0, -0.5, -0.5, -1.0]))
    assert reasons(verdicts) == ["not_selected", None, "not_selected", "not_selected"]
    assert [v.score for v in verdicts] == [-2.0, -0.5, -0.5, -1.0]


def test_keep_best_of_n_skips_failed_and_duplicate_samples():
    samples = [
        sample(0, "\\boxed{4}", mean_logprob=-3.0),
        sample(1, "\\boxed{4}", mean_logprob=-0.1),  # duplicate of 0: not eligible
        sample(2, "x \\boxed{4}", mean_logprob=-0.2, finish_reason="length"),
        sample(3, "y \\boxed{4}", mean_logprob=float("nan")),  # ranks last
        sample(4, "z \\boxed{4}", mean_logprob=-2.0),
    ]
    verdicts = checker(keep="best_of_n").judge(samples)
    assert reasons(verdicts) == ["not_selected", "duplicate", "unfinished", "not_selected", None]
    assert [v.score for v in verdicts][:3] == [-3.0, None, None]


def test_keep_best_of_n_with_a_user_score():
    samples = [sample(0, "short"), sample(1, "much longer"), sample(2, "longer")]
    verdicts = checker(keep="best_of_n", score=f"{HERE}:length_score").judge(samples)
    assert reasons(verdicts) == ["not_selected", None, "not_selected"]
    assert [v.score for v in verdicts] == [5.0, 11.0, 6.0]
    numpy = checker(keep="best_of_n", score=f"{HERE}:numpy_score").judge(samples)
    assert reasons(numpy) == [None, "not_selected", "not_selected"]


def test_a_score_function_without_best_of_n_is_refused_by_the_spec_and_never_called():
    with pytest.raises(ConfigError, match="score is only used by keep: best_of_n"):
        load_config(GenerateSpec, {"keep": "all", "score": f"{HERE}:broken_score"}, "generate")
    spec = GenerateSpec(keep="all", score=f"{HERE}:broken_score")  # built without the rules
    verdicts = Checker(spec).judge([sample()])
    assert (verdicts[0].reason, verdicts[0].score) == (None, None)


@pytest.mark.parametrize("name", ["nan_score", "text_score", "bool_score", "broken_score"])
def test_bad_user_score_raises(name):
    check = checker(keep="best_of_n", score=f"{HERE}:{name}")
    with pytest.raises(CheckError, match=f"generate.score '{HERE}:{name}' on prompt 'p0' sample 0"):
        check.judge([sample(0)])


def test_judge_takes_one_prompt_in_index_order():
    check = checker()
    assert check.judge([]) == []
    with pytest.raises(ValueError, match="one prompt"):
        check.judge([sample(0, prompt_id="a"), sample(1, prompt_id="b")])
    with pytest.raises(ValueError, match=r"increasing index order, got indexes \[1, 0\]"):
        check.judge([sample(1), sample(0)])


# --- statistics ----------------------------------------------------------------------


def verdict(passed: bool, kept: bool, reason: str | None) -> Verdict:
    return Verdict(passed, kept, reason, None, dict.fromkeys(RESULT_KEYS), None, None)


PROMPT_A = [  # 4 samples, 2 pass, 1 kept
    verdict(False, False, "wrong_answer"),
    verdict(True, True, None),
    verdict(True, False, "not_selected"),
    verdict(False, False, "unfinished"),
]
PROMPT_B = [verdict(False, False, "wrong_answer")] * 4  # 4 samples, none pass
PROMPT_C = [verdict(True, True, None), verdict(False, False, "format")]  # 2 samples, 1 passes


def test_prompt_summary():
    assert prompt_summary(PROMPT_A) == {"samples": 4, "passed": 2, "kept": 1}
    assert prompt_summary([]) == {"samples": 0, "passed": 0, "kept": 0}


def test_generation_stats_hand_computed():
    stats = GenerationStats()
    for prompt in (PROMPT_A, PROMPT_B, PROMPT_C):
        stats.add(prompt)
    data = stats.to_dict()
    assert (data["prompts"], data["samples"], data["passed"], data["kept"]) == (3, 10, 3, 2)
    assert data["passes_per_prompt"] == {"0": 1, "1": 1, "2": 1}
    assert {k: v for k, v in data["rejected"].items() if v} == {
        "wrong_answer": 5,
        "not_selected": 1,
        "unfinished": 1,
        "format": 1,
    }
    assert list(data["rejected"]) == list(REJECTION_REASONS)
    assert data["pass@1"] == 0.333333  # (2/4 + 0/4 + 1/2) / 3
    assert data["pass@n"] == 0.666667  # 2 of 3 prompts have a passing sample


def test_generation_stats_merge_and_json_round_trip():
    whole = GenerationStats()
    for prompt in (PROMPT_A, PROMPT_B, PROMPT_C):
        whole.add(prompt)
    left, right = GenerationStats(), GenerationStats()
    left.add(PROMPT_C)
    right.add(PROMPT_A)
    right.add(PROMPT_B)
    left.merge(right)
    assert left == whole
    assert left.to_dict() == whole.to_dict()
    data = json.loads(json.dumps(whole.to_dict()))
    back = GenerationStats.from_dict(data)
    assert back == whole
    assert back.to_dict() == whole.to_dict()


def test_generation_stats_empty():
    data = GenerationStats().to_dict()
    assert (data["prompts"], data["pass@1"], data["pass@n"]) == (0, 0.0, 0.0)
    assert GenerationStats.from_dict(data) == GenerationStats()
    with pytest.raises(ValueError, match="missing \\['kept'\\]"):
        GenerationStats.from_dict({"prompts": 0, "samples": 0, "passed": 0})


def test_stats_from_a_judged_prompt():
    verdicts = checker(keep="first", **REFERENCE).judge(
        [sample(0, "\\boxed{5}"), sample(1, "\\boxed{4}"), sample(2, "so \\boxed{4}")]
    )
    stats = GenerationStats()
    stats.add(verdicts)
    data = stats.to_dict()
    assert data["pass@1"] == round(2 / 3, 6) and data["pass@n"] == 1.0
    assert (data["rejected"]["wrong_answer"], data["rejected"]["not_selected"]) == (1, 1)
    assert math.isclose(stats.pass_at_1(), 2 / 3)
