"""A deterministic fake teacher for fast unit tests of the labeling plumbing.

Its distribution at each position is a function of the prefix's last token only, so
labels are reproducible and independent of batching. Acceptance tests use real vLLM.
"""

from __future__ import annotations

import numpy as np

from labelgen.teacher import SequenceLabels


class FakeTeacher:
    def __init__(self, k: int, vocab: int = 1024, seed: int = 0):
        self.k, self.vocab = k, vocab
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(vocab, vocab)).astype(np.float64) * 3
        self.logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        self.calls = 0

    def label(self, batch):
        self.calls += 1
        out = []
        for ids in batch:
            lp = self.logprobs[ids[:-1]]  # (T-1, V): distribution of token t+1
            top = np.argsort(-lp, axis=-1, kind="stable")[:, : self.k]
            out.append(
                SequenceLabels(
                    topk_ids=top.astype(np.int32),
                    topk_logprobs=np.take_along_axis(lp, top, -1).astype(np.float32),
                    target_logprobs=lp[np.arange(len(ids) - 1), ids[1:]].astype(np.float32),
                )
            )
        return out

    def provenance(self):
        return {"engine": "fake", "vllm_version": None, "dtype": "float64", "model_vocab_size": self.vocab}

    def close(self):
        pass
