"""The vLLM teacher: prompt log-probs of token-id prompts, as numpy arrays.

The only module that imports vllm. Uses the public flat path:
``SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True,
detokenize=False)`` on an engine with ``max_logprobs=k``,
``logprobs_mode="raw_logprobs"`` and prefix caching off. With flat logprobs every
position after the first holds k+1 entries: the real token first, then the top-k by
rank. Entry i is the distribution of token i given tokens < i, so label position t
is entry t+1.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from labelgen.spec import JobSpec
from labelgen.teacher import SequenceLabels

__all__ = ["VllmTeacher"]


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
        engine_args: dict[str, Any] = {"seed": 0, **t.engine_args}
        self._llm = LLM(
            model=t.model,
            tokenizer=t.tokenizer or t.model,
            revision=t.revision,
            dtype=t.dtype,
            max_model_len=t.max_model_len,
            max_logprobs=self.k,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
            **engine_args,
        )
        self._params = SamplingParams(
            max_tokens=1,
            prompt_logprobs=self.k,
            flat_logprobs=True,
            detokenize=False,
        )
        self._engine_args = engine_args

    def label(self, batch: list[np.ndarray]) -> list[SequenceLabels]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids.tolist()) for ids in batch]
        outputs = self._llm.generate(prompts, self._params, use_tqdm=False)
        return [self._convert(out.prompt_logprobs, len(ids)) for out, ids in zip(outputs, batch, strict=True)]

    def _convert(self, flat: Any, num_tokens: int) -> SequenceLabels:
        k = self.k
        starts = np.asarray(flat.start_indices, dtype=np.int64)
        ends = np.asarray(flat.end_indices, dtype=np.int64)
        # Position 0 has no distribution; each later one has k+1 entries (target first).
        assert len(starts) == num_tokens and ends[0] == starts[0], (len(starts), num_tokens)
        assert np.all(ends[1:] - starts[1:] == k + 1), "vLLM returned an unexpected logprob count"
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
            "vllm_version": self._version,
            "logprobs_mode": "raw_logprobs",
            "dtype": str(config.dtype).replace("torch.", ""),
            "model_vocab_size": int(config.get_vocab_size()),
            "engine_args": self._engine_args,
            "tensor_parallel_size": int(self._engine_args.get("tensor_parallel_size", 1)),
        }

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            del self._llm
