"""A deterministic fake teacher for fast unit tests of the labeling plumbing.

Its distribution at each position is a function of the prefix's last token only, so
labels are reproducible and independent of batching. Acceptance tests use real vLLM.
"""

from __future__ import annotations

import numpy as np

from labelgen.labels import SequenceLabels


class FakeTeacher:
    def __init__(self, k: int, vocab: int = 1024, seed: int = 0, draws: int = 0, layers=(), dim: int = 8):
        self.k, self.vocab = k, vocab
        self.draws, self.layers, self.dim = draws, tuple(layers), dim
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
                    **self._extra(ids, lp),
                )
            )
        return out

    def _extra(self, ids, lp) -> dict:
        """Draws and hidden states when asked for: deterministic per sequence."""
        extra: dict = {}
        rng = np.random.default_rng([int(x) for x in ids[:4]] + [len(ids)])
        if self.draws:
            pairs = [
                np.unique(rng.choice(self.vocab, self.draws, p=np.exp(row)), return_counts=True) for row in lp
            ]
            extra.update(
                draw_num=np.array([len(u) for u, _ in pairs], np.int32),
                draw_ids=np.concatenate([u for u, _ in pairs]).astype(np.int32),
                draw_counts=np.concatenate([c for _, c in pairs]).astype(np.int32),
            )
        if self.layers:
            positions = np.arange(len(ids) % 3, len(ids), 3)
            vectors = {layer: ids[positions, None] + layer + np.zeros((1, self.dim)) for layer in self.layers}
            extra.update(hidden_positions=positions, hidden=vectors)
        return extra

    def provenance(self):
        return {
            "engine": "fake",
            "vllm_version": None,
            "dtype": "float64",
            "model_vocab_size": self.vocab,
            "hidden_size": self.dim,
        }

    def close(self):
        pass


class FakeGenerator(FakeTeacher):
    """A fake generation teacher: ``respond(prompt_ids, seed) -> (token_ids, finish_reason)``
    decides each response (default: tokens sampled from the fake distribution with the seed,
    until EOS or max_tokens), decoded with ``tokenizer``. Deterministic per (prompt, seed),
    so a re-run asks and gets the same."""

    def __init__(self, k: int, tokenizer, respond=None, max_model_len: int = 512, **kwargs):
        super().__init__(k, vocab=len(tokenizer), **kwargs)
        self.tokenizer, self.respond = tokenizer, respond
        self.max_model_len = max_model_len
        self.requests: list[tuple[tuple[int, ...], int]] = []

    def generate(self, prompts, seeds, spec, logprobs=True):
        from labelgen.labels import Generation

        out = []
        for ids, seed in zip(prompts, seeds, strict=True):
            self.requests.append((tuple(int(t) for t in ids), int(seed)))
            if self.respond is not None:
                tokens, finish = self.respond(ids, seed, spec)
            else:
                tokens, finish = self._sample(ids, seed, spec)
            tokens = np.asarray(tokens, dtype=np.int32)
            full = np.concatenate([np.asarray(ids, np.int32), tokens])
            lp = self.logprobs[full[len(ids) - 1 : -1], full[len(ids) :]] if len(tokens) else np.zeros(0)
            eos = self.tokenizer.eos_token_id
            text = self.tokenizer.decode([t for t in tokens.tolist() if t != eos])
            mean = float(lp.mean()) if len(lp) and logprobs else float("nan")
            out.append(Generation(tokens, text, finish, mean))
        return out

    def _sample(self, ids, seed, spec):
        rng = np.random.default_rng(seed)
        last, tokens = int(ids[-1]), []
        eos = self.tokenizer.eos_token_id
        for _ in range(spec.max_tokens):
            last = int(rng.choice(self.vocab, p=np.exp(self.logprobs[last])))
            tokens.append(last)
            if last == eos:
                return tokens, "stop"
        return tokens, "length"
