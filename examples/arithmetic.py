"""A synthetic task with checkable answers, and a tiny teacher that is right often, not always.

The sequence-level distillation demo samples several answers per prompt from this
teacher, keeps those whose final answer checks out, and trains students on them. That
needs a task whose answers can be checked (multi-digit addition), a worked solution
short enough for a tiny model to learn (column by column, carries written out), and a
teacher that errs often enough when sampled for rejection sampling to matter.

A tiny Llama learns column addition *perfectly* within a minute, so under-training
is a poor way to make it err: its accuracy then depends on the machine's speed (on
two-digit sums, 45% of samples right after 150 steps, 92% after 250). Instead the teacher is trained to
convergence on *sloppy* traces: each carry is forgotten with probability ``slip``
(the trace then goes on consistently, so its boxed answer is wrong). A converged
teacher has learnt that rate: greedy decoding carries (``slip < 0.5``), sampling
forgets a carry now and then, and a student trained on every sample would learn the
sloppiness that the reference check filters out.

Import it by path (``examples/`` is not a package): a script in ``examples/`` has this
directory on ``sys.path`` already (``from arithmetic import make_records``); elsewhere
put ``examples/`` on ``sys.path`` first. Build a teacher and measure it (about two
minutes on two cores):

    .venv/bin/python examples/arithmetic.py --out demo-output/arithmetic/teacher
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DIGITS",
    "HELDOUT_BUCKETS",
    "TEACHER_RECIPE",
    "make_records",
    "solve",
    "extract_boxed",
    "check_answer",
    "build_teacher",
    "greedy_answers",
    "sample_answers",
]

DIGITS = 3
"""Digits per operand in the demo's problems (three columns, two carries to forget)."""

HELDOUT_BUCKETS = 10
"""One problem in this many is held out: those whose pair hash is 0 modulo this."""

TEACHER_RECIPE: dict[str, Any] = {
    # 256 byte-level symbols + 6 specials: a BPE with no room for a merge, so every
    # character (each digit in particular) is one token and the columns line up.
    "vocab_size": 262,
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,  # head_dim 32, the least vLLM's CPU attention takes
    "intermediate_size": 256,
    "steps": 400,
    "batch_size": 64,  # problems per step, one per row (about 50 tokens each)
    "lr": 3e-3,
    "slip": 0.4,  # chance that a training trace forgets a carry it should write
}
"""The teacher :func:`build_teacher` makes (``steps`` is cut if ``seconds`` runs out)."""

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


# -------------------------------------------------------------------------------------
def _heldout(a: int, b: int) -> bool:
    """Whether ``a+b`` belongs to the held-out split; ``b+a`` always goes the same way."""
    key = f"{min(a, b)}+{max(a, b)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % HELDOUT_BUCKETS == 0


def solve(a: int, b: int, slip: float = 0.0, rng: random.Random | None = None) -> str:
    """The worked solution of ``a+b``: columns right to left, then the boxed sum.

    Each column is ``x+y+c=ss``, with ``c`` the carry into it (the tens digit of the
    previous column's ``ss``) and ``ss`` always two digits, so every column has the same
    shape; the boxed sum is read off the columns:
    ``solve(47, 38) == "7+8+0=15 4+3+1=08 \\\\boxed{85}"``. A shorter operand is read
    with leading zeros.

    With ``slip > 0`` (and ``rng``), each carry of 1 is written as 0 with probability
    ``slip`` and the rest follows from what was written: a consistent trace with a
    wrong answer, as a sloppy teacher would write it.
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    carry, columns, digits = 0, [], []
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        if carry and slip and rng is not None and rng.random() < slip:
            carry = 0
        total = x + y + carry
        columns.append(f"{x}+{y}+{carry}={total:02d}")
        digits.append(str(total % 10))
        carry = total // 10
    answer = int(("1" if carry else "") + "".join(reversed(digits)))
    return " ".join(columns) + f" \\boxed{{{answer}}}"


def make_records(count: int, seed: int, digits: int = DIGITS, split: str = "train") -> list[dict]:
    """``count`` distinct addition problems of two ``digits``-digit numbers.

    Each record is ``{"id", "prompt", "answer", "solution"}``: the prompt ``"47+38="``,
    the answer ``"85"`` and the correct worked solution :func:`solve` writes, the
    assistant's reply to the prompt (a user message: the teacher is a chat model).

    The splits are disjoint by construction, whatever the seeds: a problem is held out
    when the hash of its unordered pair falls in bucket 0 of :data:`HELDOUT_BUCKETS`
    (``a+b`` and ``b+a`` share a split), and ``split`` says which side to draw from.
    Within one call the problems are distinct; the same ``(count, seed, digits,
    split)`` always gives the same records.

    Raises:
        ValueError: a bad ``split``, ``digits`` or ``count``, or more problems asked for
            than the split holds (about 90% / 10% of the ``(9 * 10**(digits-1))**2`` pairs).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    low, high = (10 ** (digits - 1) if digits > 1 else 0), 10**digits - 1
    rng = random.Random(f"arithmetic/{digits}/{split}/{seed}")  # a str seed is stable across runs
    seen: set[tuple[int, int]] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 50 * count + 10_000:
            share = 1 / HELDOUT_BUCKETS if split == "heldout" else 1 - 1 / HELDOUT_BUCKETS
            raise ValueError(
                f"could not draw {count} distinct {digits}-digit {split} problems: the split holds about "
                f"{(high - low + 1) ** 2 * share:.0f}; ask for fewer, or raise digits"
            )
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) in seen or _heldout(a, b) != (split == "heldout"):
            continue
        seen.add((a, b))
        records.append(
            {
                "id": f"add{digits}-{split}-{seed}-{len(records):06d}",
                "prompt": f"{a}+{b}=",
                "answer": str(a + b),
                "solution": solve(a, b),
            }
        )
    return records


def extract_boxed(response: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` in ``response``, or None."""
    found = _BOXED.findall(response)
    return found[-1].strip() if found else None


def check_answer(response: str, reference: str) -> bool:
    """Whether the last ``\\boxed{...}`` of ``response`` holds the integer ``reference``."""
    got = extract_boxed(response)
    try:
        return got is not None and int(got) == int(reference)
    except ValueError:
        return False


# -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: unchanged) inside the block."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _render(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Prompt ids as ``labelgen generate`` makes them: chat-rendered, no special tokens added."""
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def build_teacher(
    out_dir: str | Path,
    records: list[dict],
    seconds: float = 120.0,
    seed: int = 0,
    steps: int | None = None,
    slip: float | None = None,
    threads: int | None = 1,
    log=print,
) -> Path:
    """Train the teacher on ``records``' (sloppy) solutions; its HF model directory.

    A character-level tokenizer (:func:`labelgen.testing.build_tokenizer`, no merges,
    with its chat template) and a small Llama (:func:`labelgen.testing.build_llama`),
    trained with CE on ``<|user|>prompt<|eos|><|assistant|>solution<|eos|>``, one problem
    per row, loss on the reply only: the eos teaches it to stop. The directory loads
    with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``vllm.LLM(model=...)``;
    ``recipe.json`` in it records what was done (:data:`TEACHER_RECIPE`, as run).

    Args:
        out_dir: where the checkpoint goes (created; a model already there is replaced).
        records: training problems from :func:`make_records`.
        seconds: wall-clock budget for the training loop: after timing a few steps,
            ``steps`` is cut to fit (so a slow machine gets a less trained teacher).
        seed: seeds the initialisation, the batch order and the slips.
        steps: training steps (default ``TEACHER_RECIPE["steps"]``, enough to converge).
        slip: chance that a training trace forgets a carry (default ``TEACHER_RECIPE``).
        threads: torch threads while training (restored after); None keeps torch's.
            One by default: a model this small gains little from a second thread and
            loses several times over when another process is busy on the cores.
        log: a ``print``-like callable, or None for silence.
    """
    recipe = {
        **TEACHER_RECIPE,
        "steps": steps or TEACHER_RECIPE["steps"],
        "slip": TEACHER_RECIPE["slip"] if slip is None else slip,
        "seed": seed,
    }
    with _torch_threads(threads):
        return _build_teacher(Path(out_dir), records, seconds, recipe, log)


def _build_teacher(out: Path, records: list[dict], seconds: float, recipe: dict, log) -> Path:
    import torch

    from labelgen.testing import build_llama, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"arithmetic/slips/{recipe['seed']}")
    solutions = []
    for r in records:
        a, b = (int(x) for x in r["prompt"].rstrip("=").split("+"))
        solutions.append(solve(a, b, recipe["slip"], rng))
    tokenizer = build_tokenizer(
        out,
        [r["prompt"] + s for r, s in zip(records, solutions, strict=True)],
        vocab_size=recipe["vocab_size"],
    )
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("0123456789", add_special_tokens=False)["input_ids"])
    assert pieces == list("0123456789"), f"digits must be one token each, got {pieces}"
    build_llama(
        out,
        tokenizer,
        hidden_size=recipe["hidden_size"],
        num_layers=recipe["num_layers"],
        num_heads=recipe["num_heads"],
        intermediate_size=recipe["intermediate_size"],
        seed=recipe["seed"],
    )
    rows, labels = _rows(tokenizer, [r["prompt"] for r in records], solutions)
    per_step = _time_steps(out, rows[: recipe["batch_size"]])
    affordable = max(1, int(seconds / per_step))
    if affordable < recipe["steps"]:
        if log:
            log(f"teacher: {per_step * 1000:.0f} ms/step, {seconds:.0f}s affords {affordable} steps")
        recipe["steps"] = affordable
    t0 = time.monotonic()
    result = _train(out, rows, labels, recipe, log)
    recipe.update(
        train_seconds=round(time.monotonic() - t0, 1),
        records=len(records),
        slipped=sum(s != r["solution"] for r, s in zip(records, solutions, strict=True)),
        tokens_per_solution=round(float((labels != -100).sum()) / len(records), 2),  # eos included
        torch_threads=torch.get_num_threads(),
        **{k: round(v, 4) for k, v in result.items()},
    )
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    if log:
        log(
            f"teacher: {recipe['steps']} steps in {recipe['train_seconds']:.0f}s "
            f"(CE {result['first_loss']:.3f} → {result['last_loss']:.3f}; {recipe['slipped']} of "
            f"{len(records)} traces slipped) → {out}"
        )
    return out


def _rows(tokenizer: Any, prompts: list[str], solutions: list[str]) -> tuple[Any, Any]:
    """(input ids, labels), both ``(len(prompts), T)``: one problem per row, from position 0.

    Each row is the chat-rendered prompt, the solution and eos, right-padded; labels
    are the ids on the solution and eos, -100 on the prompt and the pad. A row per
    problem, rather than packed text (:func:`labelgen.testing.pretrain`), puts every
    prompt at position 0, as it is when the teacher is asked.
    """
    import torch

    encoded = []
    for prompt, solution in zip(prompts, solutions, strict=True):
        reply = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((_render(tokenizer, prompt, chat=True), reply))
    width = max(len(p) + len(s) for p, s in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    for i, (prompt, reply) in enumerate(encoded):
        ids[i, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        labels[i, len(prompt) : len(prompt) + len(reply)] = torch.tensor(reply)
    return ids, labels


def _train(out: Path, rows: Any, labels: Any, recipe: dict, log) -> dict[str, float]:
    """Train the model at ``out`` with CE on (rows, labels) and save it back; first/last loss.

    The loop of :func:`labelgen.testing.pretrain` (AdamW, one-cycle schedule, gradient
    clipping at 1) over whole-problem rows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    steps, batch_size, lr = recipe["steps"], recipe["batch_size"], recipe["lr"]
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe["seed"])
    losses = []
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        pick = torch.randint(0, rows.shape[0], (batch_size,), generator=gen)
        # No attention mask: the pad is on the right, where causal attention never looks back.
        loss = model(input_ids=rows[pick], labels=labels[pick]).loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(steps // 5, 1) == 0:
            log(
                f"  teacher step {step + 1}/{steps} | ce {loss.item():.4f} | lr {sched.get_last_lr()[0]:.1e} "
                f"| {time.monotonic() - t0:.0f}s"
            )
    model.save_pretrained(str(out), safe_serialization=True)
    return {"first_loss": losses[0], "last_loss": losses[-1]}


def _time_steps(model_dir: Path, batch: Any, steps: int = 3) -> float:
    """Seconds per training step on ``batch`` (a throwaway copy of the model; the median)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=0.0)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optim.step()
        optim.zero_grad()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


# -------------------------------------------------------------------------------------
def _load(model: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory, or a ``(model, tokenizer)`` pair as is."""
    if isinstance(model, tuple):
        return model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32), tokenizer


def _generate(model: Any, prompts: list[str], n: int, max_new_tokens: int, opts: dict, **kw) -> list:
    """``n`` completions per prompt (a list of lists), in batches of left-padded prompts."""
    import torch

    model, tokenizer = _load(model)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    try:
        with _torch_threads(opts["threads"]), torch.no_grad():
            for start in range(0, len(prompts), opts["batch_size"]):
                encoded = [
                    _render(tokenizer, p, opts["chat"]) for p in prompts[start : start + opts["batch_size"]]
                ]
                width = max(map(len, encoded))
                ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
                mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
                found = model.generate(
                    input_ids=ids.to(model.device),
                    attention_mask=mask.to(model.device),
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=pad,
                    **kw,
                )
                texts = tokenizer.batch_decode(found[:, width:], skip_special_tokens=True)
                out.extend(texts[i : i + n] for i in range(0, len(texts), n))
    finally:
        model.train(was_training)
    return out


def greedy_answers(
    model_dir: Any,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 100,
    chat: bool = True,
    threads: int | None = 1,
) -> list[str]:
    """The greedy completion of each prompt, with transformers on the CPU.

    Args:
        model_dir: an HF model directory (the teacher's, or a student's ``final/``), or
            an already loaded ``(model, tokenizer)`` pair.
        prompts: prompt texts (the records' ``prompt``).
        max_new_tokens: the longest completion; generation also stops at eos.
        batch_size: prompts per ``generate`` call (left-padded).
        chat: render each prompt as a user message with the tokenizer's chat template and
            its generation prompt, as ``labelgen generate`` does by default (the teacher is
            trained so); False: tokenize the text as it is (``generate.chat_template: false``).
        threads: torch threads meanwhile (restored after); None keeps torch's.
    """
    opts = {"batch_size": batch_size, "chat": chat, "threads": threads}
    return [texts[0] for texts in _generate(model_dir, prompts, 1, max_new_tokens, opts, do_sample=False)]


def sample_answers(
    model_dir: Any,
    prompts: list[str],
    n: int = 4,
    temperature: float = 0.6,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 50,
    chat: bool = True,
    threads: int | None = 1,
) -> list[list[str]]:
    """``n`` sampled completions of each prompt: pure temperature sampling (no top-k/top-p).

    Seeded through a forked torch RNG, so the caller's random state is left as it was.
    Other arguments as in :func:`greedy_answers`.
    """
    import torch

    opts = {"batch_size": batch_size, "chat": chat, "threads": threads}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _generate(
            model_dir,
            prompts,
            n,
            max_new_tokens,
            opts,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
        )


# -------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-output/arithmetic/teacher", help="the teacher's directory")
    parser.add_argument("--train", type=int, default=20_000, help="training problems")
    parser.add_argument("--seconds", type=float, default=120.0, help="training budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = make_records(args.train, args.seed)
    heldout = make_records(200, args.seed, split="heldout")
    t0 = time.monotonic()
    teacher = build_teacher(args.out, train, seconds=args.seconds, seed=args.seed)
    print(f"built in {time.monotonic() - t0:.0f}s")
    greedy = greedy_answers(teacher, [r["prompt"] for r in heldout])
    right = sum(check_answer(g, r["answer"]) for g, r in zip(greedy, heldout, strict=True))
    print(f"greedy, {len(heldout)} held-out prompts: {right / len(heldout):.1%} right")
    some = train[:200]
    samples = sample_answers(teacher, [r["prompt"] for r in some], n=4, temperature=0.6)
    ok = [[check_answer(s, r["answer"]) for s in group] for group, r in zip(samples, some, strict=True)]
    print(
        f"T=0.6, n=4, {len(some)} training prompts: {sum(map(sum, ok)) / (4 * len(some)):.1%} of samples "
        f"right, pass@4 {sum(map(any, ok)) / len(some):.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
