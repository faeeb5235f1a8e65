"""Weighted mixtures of label datasets: domain mixing and multi-teacher ensembles.

A :class:`MixtureStream` interleaves whole batches of several :class:`LabelStream` s.
Batch ``n`` comes from component ``i`` drawn with probability ``weights[i] / sum(weights)``
by a uniform number that is a pure function of ``(seed, n)``, so the interleaving is
deterministic and resumes exactly (``state_dict`` holds ``n`` and every component's
cursor). A component that ends (``loop=False``) leaves the draw; the same uniform then
picks among the remaining ones. Each batch carries ``dataset``: a 0-d int64 array with
the component index.

Components must share a tokenizer (manifest fingerprint), or token ids would not line
up: :func:`check_compatible` refuses others, naming both URLs and fingerprints. Their
top-k widths ``k`` may differ: a batch never mixes components, and the losses take ``k``
from the batch's ``topk_ids`` shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import FormatError, Manifest
from students.stream import LabelStream

__all__ = ["MixtureStream", "MixtureError", "check_compatible", "open_mixture"]

MIXTURE_FORMAT = "labelgen-mixture/1"
_BLOCK = 4096  # uniforms drawn per RNG block
_SALT = 0x6D6978  # separates the mixture's RNG from the components' order RNG


class MixtureError(FormatError):
    """The datasets of a mixture cannot be trained on together."""


def check_compatible(urls: Sequence[str], manifests: Sequence[Manifest]) -> None:
    """Raise MixtureError unless every manifest has the first one's tokenizer fingerprint."""
    first = manifests[0].tokenizer.get("fingerprint")
    for url, manifest in zip(urls[1:], manifests[1:], strict=True):
        theirs = manifest.tokenizer.get("fingerprint")
        if theirs != first:
            raise MixtureError(
                f"mixture datasets were labeled with different tokenizers: {urls[0]} has tokenizer "
                f"fingerprint {first}, {url} has {theirs}; token ids would not line up. Mix only "
                "datasets labeled with one tokenizer (relabel the odd one with a teacher that shares it)"
            )


class MixtureStream:
    """Deterministic weighted interleaving of label streams (batch granularity).

    Args:
        streams: the components (built with the same rank / world_size).
        weights: non-negative sampling weights, one per stream (need not sum to 1).
        seed: interleaving seed.
        names: component names for messages (default: their URLs).
    """

    def __init__(
        self,
        streams: Sequence[LabelStream],
        weights: Sequence[float],
        seed: int = 0,
        names: Sequence[str] | None = None,
    ):
        if not streams:
            raise ValueError("a mixture needs at least one stream")
        if len(weights) != len(streams):
            raise ValueError(f"got {len(weights)} weights for {len(streams)} streams; give one per stream")
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0, got {list(weights)}")
        self.streams, self.weights, self.seed = list(streams), w, seed
        self.names = list(names) if names is not None else [s.url for s in streams]
        self.step = 0  # index of the next batch
        self.exhausted: set[int] = {i for i, x in enumerate(w) if x == 0}
        self._block: tuple[int, np.ndarray] | None = None

    def _uniform(self, step: int) -> float:
        block = step // _BLOCK
        if self._block is None or self._block[0] != block:
            self._block = (block, np.random.default_rng([self.seed, _SALT, block]).random(_BLOCK))
        return float(self._block[1][step % _BLOCK])

    def pick(self, step: int, exhausted: set[int]) -> int | None:
        """The component of batch ``step`` given the ended ones (None: all ended)."""
        active = [i for i in range(len(self.streams)) if i not in exhausted]
        if not active:
            return None
        cum = np.cumsum(self.weights[active])
        u = self._uniform(step) * cum[-1]
        return active[min(int(np.searchsorted(cum, u, side="right")), len(active) - 1)]

    @property
    def counts(self) -> dict[str, int]:
        """Skipped shards per component (``verify='skip'``)."""
        return {name: len(s.skipped_shards) for name, s in zip(self.names, self.streams, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": MIXTURE_FORMAT,
            "seed": self.seed,
            "weights": self.weights.tolist(),
            "step": self.step,
            "exhausted": sorted(self.exhausted),
            "streams": [s.state_dict() for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != MIXTURE_FORMAT:
            raise ValueError(
                f"not a mixture cursor (format={state.get('format')!r}); was it saved by a LabelStream?"
            )
        if state["seed"] != self.seed or state["weights"] != self.weights.tolist():
            raise ValueError(
                f"mixture cursor was saved with seed {state['seed']} and weights {state['weights']}, this "
                f"mixture has seed {self.seed} and weights {self.weights.tolist()}; exact resume needs both"
            )
        if len(state["streams"]) != len(self.streams):
            raise ValueError(
                f"mixture cursor has {len(state['streams'])} components, this has {len(self.streams)}"
            )
        for stream, sub in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(sub)
        self.step, self.exhausted = int(state["step"]), set(state["exhausted"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches (shapes in :func:`students.stream.collate`) plus ``dataset`` (0-d int64),
        each component read in this process (:func:`students.loader.make_loader` reads
        components with DataLoader workers through :meth:`batches`)."""
        return self.batches(iter)

    def batches(self, read: Callable[[LabelStream], Iterator[dict[str, np.ndarray]]]) -> Iterator[dict]:
        """Like iterating the mixture, with component ``i``'s batches from ``read(streams[i])``."""
        iterators: dict[int, Iterator[dict[str, np.ndarray]]] = {}
        try:
            while (i := self.pick(self.step, self.exhausted)) is not None:
                if i not in iterators:
                    iterators[i] = read(self.streams[i])
                try:
                    batch = next(iterators[i])
                except StopIteration:
                    self.exhausted.add(i)  # the same uniform picks among the rest
                    continue
                self.step += 1
                batch["dataset"] = np.array(i, np.int64)
                yield batch
        finally:
            for it in iterators.values():
                close = getattr(it, "close", None)
                if close is not None:
                    close()


def open_mixture(
    sources: Sequence[tuple[str, float]],
    batch_sequences: int,
    seed: int = 0,
    **stream_kwargs: Any,
) -> MixtureStream:
    """A mixture over complete datasets ``[(url, weight), ...]``; checks their tokenizers.

    ``stream_kwargs`` go to every :class:`LabelStream` (shuffle, loop, rank, world_size,
    num_workers, verify, ...); each component orders its row groups with ``seed``.
    """
    urls = [url for url, _ in sources]
    manifests = [read_manifest(url) for url in urls]
    check_compatible(urls, manifests)
    streams = [
        LabelStream(url, m, None, batch_sequences, seed=seed, **stream_kwargs)
        for url, m in zip(urls, manifests, strict=True)
    ]
    return MixtureStream(streams, [w for _, w in sources], seed=seed, names=urls)
