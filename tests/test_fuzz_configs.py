"""Fuzz targets over the config readers: the job spec, the student config, overrides.

Every input ends in a config or a ConfigError, never another exception; a config that
loads can be used (hashed, dumped, reloaded to the same value), and a ConfigError never
comes from a rule that raised (``could not be checked``: a bug in that rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given
from hypothesis import strategies as st

from fuzzing import mutate, mutations
from labelgen.contract.configs import ConfigError, config_to_dict, load_config, parse_overrides
from labelgen.spec import JobSpec, load_spec
from students.config import TrainConfig, load_train_config

pytestmark = pytest.mark.fuzz

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
JOB = MANIFESTS / "jobs" / "tiny-cpu.yaml"
STUDENT = MANIFESTS / "students" / "tiny-cpu.yaml"

# Values a YAML field may be given: every scalar kind (big ints, non-finite floats,
# strings YAML reads as something else), nested lists and mappings (string or integer keys).
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**63, -(2**63) - 1, 2**64, 10**40, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(
        [
            "",
            "auto",
            "~",
            "null",
            "yes",
            "2024-01-01",
            "1:30",
            "0x1f",
            "s3://bucket/p",
            "s3://[x",
            "http://user:pw@host/p",
            "https://h/p?X-Amz-Signature=1",
            "AKIAABCDEFGHIJKLMNOP",
            "*a",
            "&a x",
            "!!python/object:os.system {}",
            "a\0b",
        ]
    ),
    st.integers(1000, 3000).map("x".__mul__),
)
# Keys of every kind YAML can write: field names, text, integers, null, booleans.
KEYS = st.one_of(
    st.sampled_from(["model", "k", "url", "sources", "max_logprobs", "1"]),
    st.text(max_size=8),
    st.integers(-3, 3),
    st.none(),
    st.booleans(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def _paths(data, prefix=()):
    """Every key path of a nested dict/list, containers included."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _with(data, path, value):
    """A deep copy of ``data`` with ``value`` at ``path`` (None for value: the key removed)."""
    data = json.loads(json.dumps(data))
    node = data
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return data
        if not isinstance(node, dict | list):
            return data
    if isinstance(node, dict):
        if value is _DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        node[path[-1]] = None if value is _DELETE else value
    return data


_DELETE = object()


def _loads(load, path, overrides=()):
    """``load(path, overrides)``: the config, or None after a ConfigError; nothing else escapes."""
    try:
        cfg = load(str(path), list(overrides))
    except ConfigError as exc:
        assert exc.errors, exc
        assert "could not be checked" not in str(exc), exc  # a rule raised on this input
        event("ConfigError")
        return None
    event("loaded")
    return cfg


def _same(a, b) -> bool:
    """Equal as saved (defaults hold lists where loaded values hold tuples; NaN is itself)."""
    return json.dumps(config_to_dict(a), sort_keys=True) == json.dumps(config_to_dict(b), sort_keys=True)


def _usable_spec(spec: JobSpec) -> None:
    """What a job does with its spec: hash it, save it next to the labels, read it back."""
    spec.content_hash()
    spec.model_parallel_size()
    assert _same(load_config(JobSpec, yaml.safe_load(spec.to_yaml())), spec)


def _usable_student(cfg: TrainConfig) -> None:
    """What the trainer does with its config: save it (YAML, JSON metrics), plan its stages."""
    saved = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    assert _same(load_config(TrainConfig, yaml.safe_load(saved)), cfg)
    assert cfg.total_steps >= 1
    cfg.resolved_stages()


JOB_DATA = yaml.safe_load(JOB.read_text())
STUDENT_DATA = yaml.safe_load(STUDENT.read_text())
# Fields the examples leave out, so that their types get fuzzed too.
JOB_PATHS = sorted(
    {
        *_paths(JOB_DATA),
        ("hidden",),
        ("hidden", "layers"),
        ("labels", "draws"),
        ("labels", "codec"),
        ("cluster",),
        ("cluster", "resources"),
        ("cluster", "env_vars"),
        ("cluster", "gpus_per_replica"),
        ("teacher", "tokenizer"),
        ("teacher", "engine_args", "tensor_parallel_size"),
        ("unknown",),
        (1,),  # keys that are not strings, next to those that are
        ("teacher", None),
        ("labels", True),
    },
    key=repr,
)
STUDENT_PATHS = sorted(
    {
        *_paths(STUDENT_DATA),
        ("stages",),
        ("data", "mixture"),
        ("data", "teachers"),
        ("loss", "hidden"),
        ("loss", "hidden", "layer_map"),
        ("loss", "kind"),
        ("optim", "betas"),
        ("model", "path"),
        ("unknown",),
        (1,),
        ("model", "init", 5),
        ("optim", False),
    },
    key=repr,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-configs")


def _byte_target(workdir, example: Path, name: str, edits, load, usable):
    path = workdir / name
    path.write_bytes(mutate(example.read_bytes(), edits))
    cfg = _loads(load, path)
    if cfg is not None:
        usable(cfg)


def _structured_target(workdir, data, name, where, value, how, load, usable):
    path = workdir / name
    if how == "delete":
        path.write_text(yaml.safe_dump(_with(data, where, _DELETE), sort_keys=False))
        overrides = []
    elif how == "file":
        path.write_text(yaml.safe_dump(_with(data, where, value), sort_keys=False))
        overrides = []
    else:  # the same value given as a dotted override
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        dotted = ".".join(str(k) for k in where)
        overrides = [f"{dotted}={yaml.safe_dump(value, default_flow_style=True, sort_keys=False)}"]
    cfg = _loads(load, path, overrides)
    if cfg is not None:
        usable(cfg)


@given(edits=mutations())
def test_fuzz_job_spec_bytes(workdir, edits):
    _byte_target(workdir, JOB, "job-bytes.yaml", edits, load_spec, _usable_spec)


@given(
    where=st.sampled_from(JOB_PATHS),
    value=VALUES,
    how=st.sampled_from(["file", "override", "delete"]),
)
def test_fuzz_job_spec_fields(workdir, where, value, how):
    _structured_target(workdir, JOB_DATA, "job-fields.yaml", where, value, how, load_spec, _usable_spec)


@given(edits=mutations())
def test_fuzz_student_config_bytes(workdir, edits):
    _byte_target(workdir, STUDENT, "student-bytes.yaml", edits, load_train_config, _usable_student)


@given(
    where=st.sampled_from(STUDENT_PATHS),
    value=VALUES,
    how=st.sampled_from(["file", "override", "delete"]),
)
def test_fuzz_student_config_fields(workdir, where, value, how):
    _structured_target(
        workdir, STUDENT_DATA, "student-fields.yaml", where, value, how, load_train_config, _usable_student
    )


# Text made mostly of what YAML and dotted keys give meaning to, plus any character.
OVERRIDE_TEXT = st.text(
    alphabet=st.sampled_from(list("abk.=:,-_ 0123456789[]{}*&!|>'\"#%@`~?\n\t\0\\")) | st.characters(),
    max_size=40,
)
OVERRIDE_KEYS = st.sampled_from(["labels.k", "teacher.engine_args", "a.b", "x", "labels..k", ".", "teacher"])
OVERRIDE = st.one_of(
    OVERRIDE_TEXT,
    st.builds(
        "{}={}".format,
        OVERRIDE_KEYS | OVERRIDE_TEXT,
        OVERRIDE_TEXT | VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True, sort_keys=False)),
    ),
)


@given(overrides=st.lists(OVERRIDE, max_size=4))
def test_fuzz_parse_overrides(overrides):
    try:
        nested = parse_overrides(overrides)
    except ConfigError as exc:
        assert exc.errors
        return
    assert isinstance(nested, dict)
    json.dumps(nested, default=str)


@given(
    where=st.sampled_from([".".join(map(str, p)) for p in JOB_PATHS] + ["labels", "teacher.engine_args.x.y"]),
    raw=OVERRIDE_TEXT,
)
def test_fuzz_job_spec_override_text(workdir, where, raw):
    path = workdir / "job-override.yaml"
    path.write_bytes(JOB.read_bytes())
    spec = _loads(load_spec, path, [f"{where}={raw}"])
    if spec is not None:
        _usable_spec(spec)


# YAML text built from its own tokens (anchors, aliases, merge keys, tags, flow and block
# collections), so that the reader meets what byte flips of one example rarely make.
YAML_TOKENS = st.sampled_from(
    [
        *"[]{},",
        ": ",
        "- ",
        "? ",
        "\n",
        "\n  ",
        "\n    ",
        "&a ",
        "&b ",
        "*a",
        "*b",
        "<<: ",
        "!!python/tuple ",
        "!!set ",
        "!!binary ",
        "!!str ",
        "!!int ",
        "!!float ",
        "!!timestamp ",
        "!!omap ",
        "!x ",
        "'q'",
        '"\\0"',
        '"\\ud800"',
        "1",
        "0x1f",
        "1:30",
        "1.5e+3",
        ".nan",
        "-.inf",
        "2024-01-01",
        "null",
        "~",
        "yes",
        "teacher",
        "model",
        "corpus",
        "sources",
        "output",
        "url",
        "labels",
        "k",
        "engine_args",
        "# c",
        "|",
        ">-",
        "---",
        "...",
        "%YAML 1.1\n",
        "\t",
        "\ufeff",
    ]
)


@given(tokens=st.lists(YAML_TOKENS, max_size=60))
def test_fuzz_job_spec_yaml_tokens(workdir, tokens):
    path = workdir / "job-tokens.yaml"
    path.write_text("".join(tokens))
    spec = _loads(load_spec, path)
    if spec is not None:
        _usable_spec(spec)
