"""Mixtures of label datasets: weighted deterministic interleaving, exact resume, tokenizer checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fakes import FakeTeacher
from helpers import make_spec
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.runner import run_job
from labelgen.spec import JobSpec
from students.mixture import MixtureError, MixtureStream, open_mixture
from students.stream import LabelStream


@pytest.fixture(scope="module")
def k4_labels(teacher_dir, corpus_dir, tmp_path_factory) -> str:
    """Half the corpus labeled at k=4 by the fake teacher (same tokenizer as fake_labels)."""
    out = str(tmp_path_factory.mktemp("k4") / "ds")
    sections = {"labels": {"k": 4}, "corpus": {"sources": [f"{corpus_dir}/a.jsonl"]}}
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out, **sections))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    return out


def mix(urls_weights, seed=0, **kw) -> MixtureStream:
    return open_mixture(urls_weights, 4, seed=seed, **kw)


def key(batch) -> tuple:
    return int(batch["dataset"]), tuple(np.asarray(batch["token_hash"]).tolist())


def test_interleaving_is_weighted_and_a_function_of_the_seed(fake_labels, k4_labels):
    sources = [(fake_labels, 3.0), (k4_labels, 1.0)]
    a = [key(b) for _, b in zip(range(400), mix(sources, seed=1), strict=False)]
    b = [key(b) for _, b in zip(range(400), mix(sources, seed=1), strict=False)]
    c = [key(b) for _, b in zip(range(400), mix(sources, seed=2), strict=False)]
    assert a == b and [x[0] for x in a] != [x[0] for x in c]
    share = np.mean([x[0] == 0 for x in a])
    assert 0.68 < share < 0.82  # 0.75 expected; binomial sd ~0.022


def test_batches_say_their_dataset_and_keep_their_own_k(fake_labels, k4_labels):
    m = mix([(fake_labels, 1.0), (k4_labels, 1.0)], loop=False, shuffle=False)
    rows = {0: 0, 1: 0}
    for batch in m:
        d = int(batch["dataset"])
        assert batch["topk_ids"].shape[-1] == (8 if d == 0 else 4)
        rows[d] += len(batch["input_ids"])
    # loop=False: each component is read once; the draw continues over the rest when one ends
    assert rows == {0: read_manifest(fake_labels).totals["rows"], 1: read_manifest(k4_labels).totals["rows"]}
    assert m.exhausted == {0, 1}


@pytest.mark.parametrize("cut", [1, 17, 60])
def test_resume_gives_the_same_next_batches(fake_labels, k4_labels, cut):
    sources = [(fake_labels, 2.0), (k4_labels, 1.0)]
    ref = [b for _, b in zip(range(cut + 15), mix(sources, seed=3), strict=False)]
    first = mix(sources, seed=3)
    it = iter(first)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    del it
    resumed = mix(sources, seed=3)
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(15), resumed, strict=False)]
    for x, y in zip(ref[cut:], rest, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_resume_refuses_other_weights(fake_labels, k4_labels):
    state = mix([(fake_labels, 2.0), (k4_labels, 1.0)]).state_dict()
    with pytest.raises(ValueError, match=r"weights \[2.0, 1.0\]"):
        mix([(fake_labels, 1.0), (k4_labels, 1.0)]).load_state_dict(state)


def test_different_tokenizers_are_refused_naming_both(fake_labels, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fake_labels, other)
    data = json.loads((other / "manifest.json").read_text())
    mine = data["tokenizer"]["fingerprint"]
    data["tokenizer"]["fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MixtureError, match=rf"{fake_labels}.*{mine}.*{other}.*{'f' * 64}"):
        mix([(fake_labels, 1.0), (str(other), 1.0)])


def test_bad_weights_are_refused(fake_labels):
    m = read_manifest(fake_labels)
    s = LabelStream(fake_labels, m, None, 4)
    with pytest.raises(ValueError, match="one per stream"):
        MixtureStream([s], [1.0, 2.0])
    with pytest.raises(ValueError, match="not all 0"):
        MixtureStream([s], [0.0])
