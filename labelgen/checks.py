"""Verification of generated samples (rejection sampling) and the keep policy of ``labelgen generate``.

The teacher writes ``generate.n`` responses per prompt; :class:`Checker` judges one
prompt's samples at a time against ``generate.checks`` and ``generate.keep``::

    checker = Checker(spec.generate)          # imports checks.user / score once
    verdicts = checker.judge(samples)         # one Verdict per Sample, same order
    stats.add(verdicts)                       # GenerationStats, for the manifest

Checks run in a fixed order and stop at the first failure, whose reason (a key of
:data:`REJECTION_REASONS`) the sample carries: finished, length, format, reference,
user. A sample that passes them all is ``passed`` (what pass@n counts); passing
samples that repeat an earlier passing one of the same prompt are duplicates; the keep
policy then picks among the rest. The answer helpers (:func:`extract_answer`,
:func:`parse_number`, :func:`answers_match`) and the dedup helpers (:func:`normalise`,
:func:`similarity`) are pure functions, usable on their own.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise
from typing import Any

import numpy as np

from labelgen.contract.generation import CHECK_NAMES
from labelgen.spec import GenerateSpec

__all__ = [
    "REJECTION_REASONS",
    "CheckError",
    "Sample",
    "Verdict",
    "extract_answer",
    "parse_number",
    "answers_match",
    "normalise",
    "similarity",
    "Checker",
    "prompt_summary",
    "GenerationStats",
]

REJECTION_REASONS: dict[str, str] = {
    "unfinished": "the response was cut at generate.max_tokens (finish reason 'length')",
    "too_short": "the response has fewer tokens than checks.min_tokens",
    "too_long": "the response has more tokens than checks.max_tokens",
    "format": "the response does not match checks.format (re.fullmatch, DOTALL)",
    "no_answer": "no final answer could be extracted from the response (checks.reference.extract)",
    "wrong_answer": "the extracted answer does not match the record's reference",
    "user": "the user check (checks.user) said no",
    "duplicate": "the response repeats an earlier passing response of the same prompt (checks.dedup)",
    "not_selected": "the sample passed but the keep policy (generate.keep) kept another",
}
"""Every reason a sample can be rejected for, in the order the checks run."""

RESULT_KEYS = CHECK_NAMES  # the checks a stored sample's ``checks`` struct reports (one home: the format)
"""The keys of :attr:`Verdict.results`."""

ANSWER_MODES = ("as_is", "boxed", "last_number", "regex")

_EXPONENT_LIMIT = 1000  # a larger decimal exponent is parsed as a float, not an exact Fraction


class CheckError(ValueError):
    """A user function (checks.user, score) cannot be imported, has the wrong signature,
    raised, or returned a value of the wrong kind."""


@dataclass(frozen=True)
class Sample:
    """One generated response to one prompt, as the checks and user functions see it."""

    prompt_id: str
    """The prompt's record id."""
    index: int
    """Sample index within its prompt, 0..n-1."""
    prompt: Any
    """The prompt as sent: chat messages ``[{role, content}]``, a text, or token ids."""
    response: str
    """The detokenized response text."""
    token_ids: tuple[int, ...]
    """The response's token ids."""
    finish_reason: str
    """Why generation stopped: 'stop', 'length', or another engine reason."""
    mean_logprob: float
    """The teacher's mean log-prob of the response tokens, from generation-time log-probs: NaN
    while checks run unless the job asks for those (``generate.labels: false``, or ``keep:
    best_of_n`` by mean_logprob); with labels, a kept sample's comes from its labels, after
    the checks."""
    reference: str | None = None
    """The record's reference field (checks.reference.field) as text; None when absent."""
    record: Mapping[str, Any] = field(default_factory=dict)
    """The prompt record's other fields."""


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Checker.judge` decided about one sample."""

    passed: bool
    """Passed every verification check that is on (what pass@n counts)."""
    kept: bool
    """Passed, not a duplicate, and selected by the keep policy."""
    reason: str | None
    """None when kept; else the first failing check's reason (a key of REJECTION_REASONS)."""
    answer: str | None
    """The answer extracted from the response (None: reference check off, not reached, or none)."""
    results: dict[str, bool | None]
    """Each check's outcome, keyed by RESULT_KEYS; None = check off or not reached."""
    detail: str | None
    """The user check's reason text when it gave one, else None."""
    score: float | None
    """The best_of_n score (unique passing samples, keep: best_of_n only), else None."""


# --- answers -------------------------------------------------------------------------

_SIGN = r"[-+\u2212]"
_MANTISSA = r"(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_EXP = r"[eE][-+]?\d+"
# A sign counts only when it does not follow a word or a closing bracket: "5-3" is a
# difference, so its last number is 3, not -3.
_NUMBER_IN_TEXT = re.compile(rf"(?:(?<![\w)\]}}]){_SIGN})?{_MANTISSA}(?:{_EXP})?(?:/{_MANTISSA})?")
_NUMBER = re.compile(rf"({_SIGN}?)({_MANTISSA})({_EXP})?(?:/({_MANTISSA})({_EXP})?)?")
_LATEX_FRAC = re.compile(rf"({_SIGN}?)\\[dt]?frac\{{\s*({_MANTISSA})\s*\}}\{{\s*({_MANTISSA})\s*\}}")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textrm|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_MATH_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def extract_answer(text: str, how: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer in ``text``, stripped; None when there is none (or it is empty).

    Args:
        text: a response, or a reference field.
        how: 'as_is' (the whole text); 'boxed' (the content of the last ``\\boxed{...}``
            or ``\\fbox{...}``, nested braces balanced, escaped ``\\{ \\}`` not counted;
            None when that last one never closes); 'last_number' (the last number: sign,
            digit-group commas, decimals, scientific notation, a/b fractions; a sign right
            after a letter, digit or closing bracket is read as an operator); 'regex'
            (group 1 of the last match of ``pattern`` if it has groups, else the match).
        pattern: the regular expression of 'regex' (a string or a compiled pattern).
    """
    if how == "as_is":
        found: str | None = text
    elif how == "boxed":
        found = _last_boxed(text)
    elif how == "last_number":
        numbers = _NUMBER_IN_TEXT.findall(text)
        found = numbers[-1] if numbers else None
    elif how == "regex":
        if pattern is None:
            raise ValueError("extract_answer: how='regex' needs a pattern, got None")
        found = _last_regex(text, re.compile(pattern))
    else:
        raise ValueError(f"extract_answer: how must be one of {ANSWER_MODES}, got {how!r}")
    if found is None:
        return None
    return found.strip() or None


def _last_boxed(text: str) -> str | None:
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth, i = 1, begin
    while i < len(text):
        char = text[i]
        if char == "\\":  # \{ and \} are literal braces; \\ is a line break
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def _last_regex(text: str, pattern: re.Pattern[str]) -> str | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - the loop keeps the last match
        pass
    if last is None:
        return None
    return last.group(1) if pattern.groups else last.group(0)


def _clean_answer(text: str) -> str:
    """``text`` without surrounding whitespace, a final period, math delimiters
    ($...$, \\(...\\), \\[...\\]) and \\text{...}-style wrappers, whitespace collapsed."""
    previous = None
    while text != previous:
        previous = text
        text = _TEXT_WRAPPER.sub(r"\1", text).strip()
        if text.endswith("."):
            text = text[:-1].rstrip()
        for left, right in _MATH_DELIMITERS:
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left) : -len(right)]
    return " ".join(text.split())


def parse_number(text: str) -> Fraction | float | None:
    """The number ``text`` spells, or None when it is not (just) a number.

    Accepts a sign, digit-group commas ('1,234'), decimals, scientific notation, 'a/b'
    and ``\\frac{a}{b}`` fractions, a leading currency '$', and the cleaning of
    :func:`answers_match` (math delimiters, a final period). A percent sign is dropped
    and the number kept as written: '50%' is 50, not 0.5, because a reference written
    '50' for a percentage question must match a response '50%'. The result is an exact
    Fraction, or a float when a decimal exponent exceeds 1000 (None if that overflows).
    """
    cleaned = _clean_answer(text).replace("\u2212", "-")
    cleaned = re.sub(r"^([-+]?)\\?\$\s*", r"\1", cleaned)  # currency: $12, -$5, \$3
    cleaned = re.sub(r"\s*\\?%$", "", cleaned)
    frac = _LATEX_FRAC.fullmatch(cleaned)
    if frac is not None:
        sign, num, den = frac.groups()
        return _ratio(sign, _decimal(num, None), _decimal(den, None))
    match = _NUMBER.fullmatch(cleaned)
    if match is None:
        return None
    sign, num, num_exp, den, den_exp = match.groups()
    denominator: Fraction | float | None = 1 if den is None else _decimal(den, den_exp)
    return _ratio(sign, _decimal(num, num_exp), denominator)


def _decimal(mantissa: str, exponent: str | None) -> Fraction | float | None:
    digits = mantissa.replace(",", "")
    power = int(exponent[1:]) if exponent else 0
    if abs(power) > _EXPONENT_LIMIT:  # exact arithmetic on 10**huge is a denial of service
        value = float(f"{digits}e{power}")
        return value if math.isfinite(value) else None
    return Fraction(digits) * Fraction(10) ** power


def _ratio(
    sign: str, numerator: Fraction | float | None, denominator: Fraction | float | None
) -> Fraction | float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = numerator / denominator
    return -value if sign in ("-", "\u2212") else value


def answers_match(answer: str, reference: str, rel_tol: float, abs_tol: float) -> bool:
    """Whether a response's answer equals a reference answer.

    Numbers (both parse with :func:`parse_number`) match when equal exactly, or within
    ``rel_tol`` or ``abs_tol`` (the rule of ``math.isclose``, in exact arithmetic when
    both are Fractions). Otherwise the texts must be equal after cleaning: surrounding
    whitespace, math delimiters ($...$), a final period and \\text{...} wrappers
    removed, whitespace collapsed, case folded.
    """
    a, b = parse_number(answer), parse_number(reference)
    if a is not None and b is not None:
        return a == b or _close(a, b, rel_tol, abs_tol)
    return _clean_answer(answer).casefold() == _clean_answer(reference).casefold()


def _close(a: Fraction | float, b: Fraction | float, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        bound = max(Fraction(rel_tol) * max(abs(a), abs(b)), Fraction(abs_tol))
        return abs(a - b) <= bound
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)
    except OverflowError:  # a Fraction beyond float range next to a float: not close
        return False


# --- dedup ---------------------------------------------------------------------------

_Shingles = tuple[set[tuple[str, ...]], set[tuple[str, ...]]]  # (word-3-grams, words)


def normalise(text: str) -> str:
    """``text`` with runs of whitespace collapsed to one space and the ends stripped (exact dedup)."""
    return " ".join(text.split())


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the word-3-gram sets of ``a`` and ``b``, in [0, 1].

    Words are whitespace-separated and case matters. When either text has fewer than
    3 words, the two word sets are compared instead; two empty texts are identical (1.0).
    """
    return _jaccard(_shingles(a.split()), _shingles(b.split()))


def _shingles(words: list[str]) -> _Shingles:
    """(word-3-gram set, word set) of a text; :func:`_jaccard` picks which to compare."""
    grams = {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
    return grams, {(word,) for word in words}


def _jaccard(a: _Shingles, b: _Shingles) -> float:
    short = not a[0] or not b[0]  # fewer than 3 words on either side
    left, right = (a[1], b[1]) if short else (a[0], b[0])
    union = len(left | right)
    return 1.0 if union == 0 else len(left & right) / union


# --- user functions ------------------------------------------------------------------


def _load_function(path: str, where: str) -> Callable[[Sample], Any]:
    """The function ``package.module:attr.path`` names; ``where`` is the spec field, for errors."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise CheckError(f"{where}: must look like package.module:function, got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CheckError(
            f"{where}: cannot import {path!r}: {exc}; install the package that holds it, or add its "
            "directory to PYTHONPATH, on every machine that runs the job"
        ) from exc
    except Exception as exc:
        raise CheckError(
            f"{where}: importing module {module_name!r} of {path!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for i, name in enumerate(attribute.split(".")):
        if not hasattr(target, name):
            owner = ".".join([module_name, *attribute.split(".")[:i]])
            raise CheckError(
                f"{where}: {owner!r} has no attribute {name!r} (from {path!r}); "
                f"it defines: {_callables(target)}"
            )
        target = getattr(target, name)
    if not callable(target):
        raise CheckError(f"{where}: {path!r} is a {type(target).__name__}, not a function")
    _check_signature(target, path, where)
    return target


def _callables(owner: Any, limit: int = 20) -> str:
    """The public callables ``owner`` defines (a module's own, not those it imports), for errors."""
    own = getattr(owner, "__name__", None) if inspect.ismodule(owner) else None
    names = sorted(
        name
        for name, value in vars(owner).items()
        if not name.startswith("_")
        and callable(value)
        and (own is None or getattr(value, "__module__", None) == own)
    )
    if not names:
        return "no public functions"
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_signature(fn: Callable[..., Any], path: str, where: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none to inspect; trust them
        return
    try:
        signature.bind(None)
    except TypeError as exc:
        raise CheckError(
            f"{where}: {path!r} must take one argument (a labelgen.checks.Sample), "
            f"its signature is {signature} ({exc})"
        ) from exc


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool | np.bool_)


def _user_result(value: Any) -> tuple[bool, str | None] | None:
    """(ok, reason) from a user check's return value; None when it is of the wrong kind."""
    if _is_bool(value):
        return bool(value), None
    is_pair = isinstance(value, tuple) and len(value) == 2
    if is_pair and _is_bool(value[0]) and (value[1] is None or isinstance(value[1], str)):
        return bool(value[0]), value[1]
    return None


# --- the checker ---------------------------------------------------------------------


@dataclass
class _Outcome:
    """The verification of one sample, filled in as the checks run."""

    results: dict[str, bool | None] = field(default_factory=lambda: dict.fromkeys(RESULT_KEYS))
    reason: str | None = None
    answer: str | None = None
    detail: str | None = None

    def fail(self, check: str, reason: str) -> None:
        self.results[check] = False
        self.reason = reason


class Checker:
    """Judges the samples of one prompt at a time against a :class:`GenerateSpec`.

    The reference check assumes every record has a reference when it is on (the caller
    should reject records without one before generation); a sample whose ``reference``
    is None, or whose reference yields no answer, is treated as a mismatch
    ('wrong_answer').
    """

    def __init__(self, generate: GenerateSpec) -> None:
        self._generate = generate
        self._checks = checks = generate.checks
        self._format = _compile(checks.format, re.DOTALL, "generate.checks.format")
        ref = checks.reference
        self._pattern = _compile(ref.pattern if ref else None, 0, "generate.checks.reference.pattern")
        self._user = _load_function(checks.user, "generate.checks.user") if checks.user else None
        self._score_fn = None
        if generate.score != "mean_logprob":
            self._score_fn = _load_function(generate.score, "generate.score")

    def judge(self, samples: Sequence[Sample]) -> list[Verdict]:
        """One :class:`Verdict` per sample of one prompt (given in index order), same order."""
        _check_one_prompt(samples)
        outcomes = [self._verify(sample) for sample in samples]
        passed = [i for i, outcome in enumerate(outcomes) if outcome.reason is None]
        passed_set = set(passed)
        unique = self._dedup(samples, passed, outcomes)
        scores = self._scores(samples, unique) if self._generate.keep == "best_of_n" else {}
        kept = set(self._select(unique, scores))
        for i in unique:
            if i not in kept:
                outcomes[i].reason = "not_selected"
        return [
            Verdict(
                passed=i in passed_set,
                kept=i in kept,
                reason=outcome.reason,
                answer=outcome.answer,
                results=outcome.results,
                detail=outcome.detail,
                score=scores.get(i),
            )
            for i, outcome in enumerate(outcomes)
        ]

    def _verify(self, sample: Sample) -> _Outcome:
        """Runs the verification checks in order, stopping at the first failure."""
        outcome = _Outcome()
        for check in (self._finished, self._length, self._format_check, self._reference, self._user_check):
            check(sample, outcome)
            if outcome.reason is not None:
                break
        return outcome

    def _finished(self, sample: Sample, outcome: _Outcome) -> None:
        if self._checks.finished:
            outcome.results["finished"] = True
            if sample.finish_reason == "length":
                outcome.fail("finished", "unfinished")

    def _length(self, sample: Sample, outcome: _Outcome) -> None:
        low, high = self._checks.min_tokens, self._checks.max_tokens
        if low <= 0 and high is None:
            return
        outcome.results["length"] = True
        if len(sample.token_ids) < low:
            outcome.fail("length", "too_short")
        elif high is not None and len(sample.token_ids) > high:
            outcome.fail("length", "too_long")

    def _format_check(self, sample: Sample, outcome: _Outcome) -> None:
        if self._format is not None:
            outcome.results["format"] = True
            if self._format.fullmatch(sample.response) is None:
                outcome.fail("format", "format")

    def _reference(self, sample: Sample, outcome: _Outcome) -> None:
        ref = self._checks.reference
        if ref is None:
            return
        outcome.results["reference"] = True
        outcome.answer = extract_answer(sample.response, ref.extract, self._pattern)
        if outcome.answer is None:
            outcome.fail("reference", "no_answer")
            return
        expected = None
        if sample.reference is not None:
            expected = extract_answer(sample.reference, ref.reference_extract, self._pattern)
        if expected is None or not answers_match(outcome.answer, expected, ref.rel_tol, ref.abs_tol):
            outcome.fail("reference", "wrong_answer")

    def _user_check(self, sample: Sample, outcome: _Outcome) -> None:
        if self._user is None:
            return
        where = f"generate.checks.user {self._checks.user!r} {_on(sample)}"
        try:
            value = self._user(sample)
        except Exception as exc:
            raise CheckError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        result = _user_result(value)
        if result is None:
            raise CheckError(
                f"{where} returned {_short_repr(value)} ({type(value).__name__}); "
                "it must return a bool or a (bool, reason) tuple, reason a str or None"
            )
        ok, outcome.detail = result
        outcome.results["user"] = True
        if not ok:
            outcome.fail("user", "user")

    def _dedup(self, samples: Sequence[Sample], passed: list[int], outcomes: list[_Outcome]) -> list[int]:
        """The passing samples that repeat no earlier unique one; marks the others duplicates."""
        mode = self._checks.dedup
        if mode == "none":
            return passed
        unique: list[int] = []
        seen_texts: set[str] = set()
        seen_shingles: list[_Shingles] = []
        for i in passed:
            response = samples[i].response
            if mode == "exact":
                key = normalise(response)
                duplicate = key in seen_texts
                seen_texts.add(key)
            else:
                shingles = _shingles(response.split())
                threshold = self._checks.near_threshold
                duplicate = any(_jaccard(shingles, other) >= threshold for other in seen_shingles)
                if not duplicate:
                    seen_shingles.append(shingles)
            outcomes[i].results["unique"] = not duplicate
            if duplicate:
                outcomes[i].reason = "duplicate"
            else:
                unique.append(i)
        return unique

    def _scores(self, samples: Sequence[Sample], unique: list[int]) -> dict[int, float]:
        if self._score_fn is None:
            return {i: float(samples[i].mean_logprob) for i in unique}
        return {i: self._user_score(samples[i]) for i in unique}

    def _user_score(self, sample: Sample) -> float:
        assert self._score_fn is not None
        where = f"generate.score {self._generate.score!r} {_on(sample)}"
        try:
            value = self._score_fn(sample)
        except Exception as exc:
            raise CheckError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        number = isinstance(value, int | float | np.integer | np.floating) and not _is_bool(value)
        if not number or not math.isfinite(float(value)):
            raise CheckError(
                f"{where} returned {_short_repr(value)} ({type(value).__name__}); "
                "it must return a finite float (higher is better)"
            )
        return float(value)

    def _select(self, unique: list[int], scores: dict[int, float]) -> list[int]:
        """The positions the keep policy keeps among the unique passing ones."""
        if not unique or self._generate.keep == "all":
            return unique
        if self._generate.keep == "first":
            return unique[:1]
        # best_of_n; NaN (an empty response's mean log-prob) ranks last; ties go to the lower index
        return [max(unique, key=lambda i: (_rank(scores[i]), -i))]


def _on(sample: Sample) -> str:
    return f"on prompt {sample.prompt_id!r} sample {sample.index}"


def _rank(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def _compile(pattern: str | None, flags: int, where: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise CheckError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from exc


def _check_one_prompt(samples: Sequence[Sample]) -> None:
    if len({sample.prompt_id for sample in samples}) > 1:
        ids = sorted({sample.prompt_id for sample in samples})
        raise ValueError(f"Checker.judge takes the samples of one prompt, got prompt ids {ids[:5]}")
    indexes = [sample.index for sample in samples]
    if any(b <= a for a, b in pairwise(indexes)):
        raise ValueError(f"Checker.judge takes samples in increasing index order, got indexes {indexes}")


# --- statistics ----------------------------------------------------------------------


def prompt_summary(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """``{"samples": n, "passed": c, "kept": m}`` for one prompt's verdicts."""
    return {
        "samples": len(verdicts),
        "passed": sum(v.passed for v in verdicts),
        "kept": sum(v.kept for v in verdicts),
    }


@dataclass
class GenerationStats:
    """Mergeable sample counts of a generation job (one per unit, merged for the manifest).

    ``pass_rate_sum`` is the exact sum over prompts of passed/samples (a Fraction, so
    merging in any order gives the same numbers); a prompt with no samples counts 0.
    """

    prompts: int = 0
    samples: int = 0
    passed: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Rejected samples by reason (duplicates and not-selected ones included)."""
    passes_per_prompt: dict[int, int] = field(default_factory=dict)
    """Histogram: passing samples c -> number of prompts with c passing samples."""
    pass_rate_sum: Fraction = Fraction(0)

    def add(self, verdicts: Sequence[Verdict]) -> None:
        """Counts one prompt's verdicts."""
        summary = prompt_summary(verdicts)
        self.prompts += 1
        self.samples += summary["samples"]
        self.passed += summary["passed"]
        self.kept += summary["kept"]
        for verdict in verdicts:
            if verdict.reason is not None:
                self.rejected[verdict.reason] = self.rejected.get(verdict.reason, 0) + 1
        c = summary["passed"]
        self.passes_per_prompt[c] = self.passes_per_prompt.get(c, 0) + 1
        if summary["samples"]:
            self.pass_rate_sum += Fraction(c, summary["samples"])

    def merge(self, other: GenerationStats) -> None:
        """Adds ``other``'s counts to these."""
        self.prompts += other.prompts
        self.samples += other.samples
        self.passed += other.passed
        self.kept += other.kept
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        for c, count in other.passes_per_prompt.items():
            self.passes_per_prompt[c] = self.passes_per_prompt.get(c, 0) + count
        self.pass_rate_sum += other.pass_rate_sum

    def pass_at_1(self) -> float:
        """Mean over prompts of c/n: the unbiased estimate of pass@1 (0 with no prompts)."""
        return float(self.pass_rate_sum / self.prompts) if self.prompts else 0.0

    def pass_at_n(self) -> float:
        """Fraction of prompts with at least one passing sample (0 with no prompts)."""
        solved = sum(count for c, count in self.passes_per_prompt.items() if c >= 1)
        return solved / self.prompts if self.prompts else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able counts plus the derived "pass@1" and "pass@n" (6 digits).

        "rejected" lists every reason of REJECTION_REASONS (zeros too) in check order,
        then any other; histogram keys are strings, in numeric order.
        """
        reasons = [*REJECTION_REASONS, *sorted(set(self.rejected) - set(REJECTION_REASONS))]
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "passed": self.passed,
            "kept": self.kept,
            "rejected": {reason: self.rejected.get(reason, 0) for reason in reasons},
            "passes_per_prompt": {str(c): self.passes_per_prompt[c] for c in sorted(self.passes_per_prompt)},
            "pass_rate_sum": str(self.pass_rate_sum),
            "pass@1": round(self.pass_at_1(), 6),
            "pass@n": round(self.pass_at_n(), 6),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationStats:
        """The stats :meth:`to_dict` wrote (the derived pass@ fields are ignored)."""
        missing = [key for key in ("prompts", "samples", "passed", "kept") if key not in data]
        if missing:
            raise ValueError(f"generation stats: missing {missing} in {sorted(data)}")
        return cls(
            prompts=int(data["prompts"]),
            samples=int(data["samples"]),
            passed=int(data["passed"]),
            kept=int(data["kept"]),
            rejected={str(k): int(v) for k, v in data.get("rejected", {}).items() if v},
            passes_per_prompt={int(k): int(v) for k, v in data.get("passes_per_prompt", {}).items()},
            pass_rate_sum=Fraction(data.get("pass_rate_sum", "0")),
        )
