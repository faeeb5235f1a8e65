"""Typed YAML configs: unknown keys, types, rules, overrides, all errors at once."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest

from labelgen.contract import config_input
from labelgen.contract.configs import (
    MAX_CONFIG_BYTES,
    MAX_VALUES,
    ConfigError,
    load_config,
    load_config_file,
    parse_overrides,
)
from labelgen.spec import JobSpec, load_spec
from students.config import TrainConfig, load_train_config

MINIMAL = {"teacher": {"model": "/m"}, "corpus": {"sources": ["x.jsonl"]}, "output": {"url": "/o"}}


def test_minimal_spec_gets_defaults():
    spec = load_config(JobSpec, MINIMAL)
    assert spec.labels.k == 64 and spec.packing.seq_len == 2048
    assert spec.corpus.sources == ("x.jsonl",)


def test_all_errors_reported_at_once_with_dotted_paths():
    bad = {
        "teacher": {"model": "/m", "dtyp": "float32"},
        "corpus": {"sources": "not-a-list"},
        "output": {"url": "/o", "shard_mib": -1},
        "labels": {"k": 0},
        "packing": {"seq_len": "long"},
        "extra": 1,
    }
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, bad)
    errors = "\n".join(info.value.errors)
    for needle in (
        "teacher.dtyp is not a known field",
        "corpus.sources must be a list",
        "output.shard_mib must be > 0, got -1",
        "labels.k must be >= 1, got 0",
        "packing.seq_len must be an integer, got 'long'",
        "extra is not a known field",
    ):
        assert needle in errors, (needle, errors)
    assert len(info.value.errors) == 6


def test_required_field_and_literal_choices():
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, {"teacher": {"dtype": "fp8"}, "corpus": {"sources": ["a"]}, "output": {}})
    errors = "\n".join(info.value.errors)
    assert "teacher.model is required" in errors
    assert "output.url is required" in errors
    assert "teacher.dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'fp8'" in errors


def test_cross_field_rule():
    data = {**MINIMAL, "teacher": {"model": "/m", "max_model_len": 128}, "packing": {"seq_len": 256}}
    with pytest.raises(ConfigError, match=r"packing.seq_len \(256\) must be < teacher.max_model_len \(128\)"):
        load_config(JobSpec, data)


def test_engine_args_cannot_shadow_spec_fields():
    data = {**MINIMAL, "teacher": {"model": "/m", "engine_args": {"max_logprobs": 5}}}
    with pytest.raises(ConfigError, match="teacher.engine_args.max_logprobs is set by the spec itself"):
        load_config(JobSpec, data)


def test_overrides_parse_yaml_values_and_merge(tmp_path):
    assert parse_overrides(["labels.k=32", "teacher.engine_args={a: 1}", "x.y=true"]) == {
        "labels": {"k": 32},
        "teacher": {"engine_args": {"a": 1}},
        "x": {"y": True},
    }
    path = tmp_path / "s.yaml"
    path.write_text("teacher: {model: /m}\ncorpus: {sources: [a.jsonl]}\noutput: {url: /o}\nlabels: {k: 4}\n")
    spec = load_spec(str(path), ["labels.k=32", "output.url=s3://b/p"])
    assert spec.labels.k == 32 and spec.output.url == "s3://b/p"
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_spec(str(path), ["labels.k"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(str(bad))


def test_spec_hash_ignores_overwrite_only():
    a = load_config(JobSpec, MINIMAL)
    b = load_config(JobSpec, {**MINIMAL, "output": {"url": "/o", "overwrite": True}})
    c = load_config(JobSpec, {**MINIMAL, "labels": {"k": 8}})
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_student_config_rules():
    with pytest.raises(ConfigError) as info:
        load_config(
            TrainConfig,
            {
                "model": {"init": {"hidden_size": 8}},
                "data": {"url": "/l", "batch_sequences": 0},
                "loss": {"alpha": 1.5, "temperature": 0},
                "train": {"output_dir": "/o"},
            },
        )
    errors = "\n".join(info.value.errors)
    for needle in (
        "model.init.model_type is required",
        "model.tokenizer is required",
        "data.batch_sequences must be >= 1",
        "loss.alpha must be in [0, 1], got 1.5",
        "loss.temperature must be > 0",
    ):
        assert needle in errors, (needle, errors)


def test_type_errors_do_not_hide_rule_violations():
    data = {
        "teacher": {"model": "/m", "dtype": "float17", "engine_args": {"max_logprobs": 5}},
        "corpus": {"sources": []},
        "labels": {"k": 0},
        "output": {"url": "/o"},
    }
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, data)
    errors = info.value.errors
    for needle in (
        "teacher.dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'float17'",
        "teacher.engine_args.max_logprobs is set by the spec itself",
        "corpus.sources must list at least one URL or glob",
        "labels.k must be >= 1, got 0",
    ):
        assert any(e.startswith(needle) for e in errors), (needle, errors)
    assert len(errors) == 4, errors


def test_unknown_key_and_rule_violation_reported_together():
    data = {**MINIMAL, "labels": {"k": 0, "kk": 8}, "extra": 1}
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, data)
    errors = "\n".join(info.value.errors)
    assert "labels.kk is not a known field" in errors
    assert "extra is not a known field" in errors
    assert "labels.k must be >= 1, got 0" in errors
    assert len(info.value.errors) == 3


def test_a_field_with_a_type_error_gets_no_second_message():
    # seq_len takes its default (2048) for the rules, which breaks the max_model_len rule:
    # that message is about packing.seq_len, whose type error is already reported.
    data = {**MINIMAL, "teacher": {"model": "/m", "max_model_len": 128}, "packing": {"seq_len": "long"}}
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, data)
    assert info.value.errors == ["packing.seq_len must be an integer, got 'long'"]
    # data.url takes its default (None), which breaks the "url xor mixture" rule of data.url.
    student = {
        "model": {"path": "/s"},
        "data": {"url": 5, "batch_sequences": 0},
        "train": {"output_dir": "/o"},
    }
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, student)
    assert info.value.errors == [
        "data.url must be a string, got int 5",
        "data.batch_sequences must be >= 1, got 0",
    ]


def test_a_cross_field_rule_that_names_a_replaced_field_is_not_reported():
    # data.mixture takes its default ([]), model.init its default (None): the "xor" rules
    # that name them would fire on the stand-ins, not on what the user wrote.
    student = {
        "model": {"init": "llama", "tokenizer": "/t"},
        "data": {"mixture": "a,b"},
        "train": {"output_dir": "/o", "log_every": 0},
    }
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, student)
    assert info.value.errors == [
        "model.init must be a mapping, got str 'llama'",
        "data.mixture must be a list, got str 'a,b'",
        "train.log_every must be >= 1",
    ]


def test_list_items_that_built_are_checked_next_to_those_that_did_not():
    student = {
        "model": {"path": "/s"},
        "data": {"url": "/l"},
        "train": {"output_dir": "/o"},
        "stages": [{"steps": 0}, {"name": 3}],
        "optim": {"lr": 0},
    }
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, student)
    assert sorted(info.value.errors) == [
        "optim.lr must be > 0, got 0.0",
        "stages[0].steps must be >= 1, got 0",
        "stages[1].name must be a string, got int 3",
        "stages[1].steps is required",
    ]


# --- bad input: every file, override or mapping ends in a config or a ConfigError, quickly ---

VALID = "teacher: {model: /m}\ncorpus: {sources: [a.jsonl]}\noutput: {url: /o}\n"


def billion_laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefghijklmnop", "bcdefghijklmnopq", strict=False):
        if len(lines) == levels:
            break
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["default", "pure-python"])
def yaml_loader(request, monkeypatch):
    """Each case with the loader in use (libyaml's where PyYAML has it) and with PyYAML's own."""
    if request.param == "pure-python":
        monkeypatch.setattr(config_input, "_LOADER", config_input._PY_LOADER)
    return request.param


@contextmanager
def quick(seconds: float = 5.0):
    """Asserts the block took at most ``seconds`` (generous: a slow CI core, PyYAML's pure-Python loader)."""
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert took < seconds, f"took {took:.1f}s"


def peak_mib(load, *args) -> float:
    """The most memory ``load(*args)`` (which raises ConfigError) held at once, in MiB."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError):
            load(*args)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def refused(
    tmp_path, text: str | bytes, *needles: str, load=load_spec, mib: float | None = None
) -> ConfigError:
    """The ConfigError loading ``text`` raises (quickly, and within ``mib`` if given), holding ``needles``."""
    path = tmp_path / "spec.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with quick(), pytest.raises(ConfigError) as info:
        load(str(path))
    if mib is not None:
        assert peak_mib(load, str(path)) < mib
    message = str(info.value)
    assert message.startswith(f"{path} has "), message  # names the file
    for needle in needles:
        assert needle in message, (needle, message)
    return info.value


def test_alias_bomb_is_refused_without_expanding_it(tmp_path, yaml_loader):
    # 9 levels of 9 aliases: 9**9 (387 million) strings once expanded.
    refused(
        tmp_path,
        billion_laughs(),
        f"expands to more than {MAX_VALUES:,} values",
        "alias bomb",
        "*name",
        mib=16,
    )
    # Inside a field of any type, where error messages or the spec hash would expand it.
    bomb = "x:\n" + "".join(f"  {line}\n" for line in billion_laughs().splitlines())
    for field in ("model", "engine_args: {x", "dtype"):
        text = VALID.replace("model: /m", f"{field}: *i" + ("}" if "{" in field else ""))
        error = refused(tmp_path, bomb + text, "alias bomb", mib=16)
        assert len(error.errors) == 1
    # A long string repeated through aliases is as bad: its text, not its count, explodes.
    words = 'a: &a "' + "x" * 100_000 + '"\nb: [' + ", ".join(["*a"] * 1000) + "]\n"
    refused(tmp_path, words, "characters of text", "alias bomb", mib=16)


def test_a_config_with_a_few_anchors_and_merge_keys_still_loads(tmp_path, yaml_loader):
    path = tmp_path / "student.yaml"
    path.write_text(
        "model: {path: /s}\n"
        "data: {url: /l}\n"
        "train: {output_dir: /o}\n"
        "loss: &kd {alpha: 0.9, temperature: 2.0}\n"
        "stages:\n"
        "  - {steps: 10, name: ce, loss: {<<: *kd, alpha: 0.0}}\n"
        "  - {steps: 20, name: kd, loss: *kd}\n"
        "  - {steps: 20, name: cool, loss: {<<: *kd, temperature: 1.0}}\n"
    )
    cfg = load_train_config(str(path))
    assert [(s.loss.alpha, s.loss.temperature) for s in cfg.stages] == [(0.0, 2.0), (0.9, 2.0), (0.9, 1.0)]
    assert cfg.total_steps == 50


def test_merge_keys_copy_a_bounded_number_of_keys(tmp_path, yaml_loader):
    base = "base: &b {" + ", ".join(f"k{i}: {i}" for i in range(2000)) + "}\n"
    text = base + "".join(f"m{i}: {{<<: *b}}\n" for i in range(60))
    refused(tmp_path, text, "merge keys (<<: *name) copy more than", "line ", mib=64)


def test_a_node_that_contains_itself_is_refused(tmp_path, yaml_loader):
    text = "teacher: &t {model: /m, engine_args: {x: *t}}\ncorpus: {sources: [a]}\noutput: {url: /o}\n"
    refused(tmp_path, text, "teacher.engine_args.x contains itself", "remove that alias")
    refused(tmp_path, "a: &a [*a, *a]\n", "contains itself")


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        "a: " + "{x: " * 50_000 + "1" + "}" * 50_000,
        "".join(" " * i + "a:\n" for i in range(400)),
        "".join(" " * i + "- \n" for i in range(400)),
    ],
    ids=["open-brackets", "balanced-brackets", "flow-mappings", "block-mappings", "block-lists"],
)
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, yaml_loader, text):
    refused(tmp_path, text, "nested", "deep", "line 1" if "\n" not in text else "line ")


def test_megabytes_are_refused_before_they_are_read(tmp_path):
    error = refused(tmp_path, "a: " + "x" * 5_000_000 + "\n", "5,000,004 bytes", f"{MAX_CONFIG_BYTES:,}-byte")
    assert "is this the right file?" in str(error)


def test_a_large_document_under_the_size_cap_is_refused_quickly(tmp_path, yaml_loader):
    refused(tmp_path, "[" + "1," * (MAX_CONFIG_BYTES // 2 - 2) + "]", f"more than {MAX_VALUES:,} values")
    refused(tmp_path, "- 1\n" * (MAX_CONFIG_BYTES // 4 - 1), f"more than {MAX_VALUES:,} values")


@pytest.mark.parametrize(
    "text, kind",
    [
        ("- a\n- b\n", "list ['a', 'b']"),
        ("just text\n", "str 'just text'"),
        ("false\n", "bool False"),
        ("3\n", "int 3"),
    ],
)
def test_the_top_level_must_be_a_mapping(tmp_path, text, kind):
    refused(tmp_path, text, "the top level must be a mapping of section names to values", f"got {kind}")


def test_an_empty_file_is_a_mapping_with_every_default(tmp_path):
    error = refused(tmp_path, "# nothing yet\n", "teacher.model is required")
    assert "output.url is required" in str(error)


@pytest.mark.parametrize(
    "data, needles",
    [
        (b"\xff\xfe\x00\x00garbage", ["is not UTF-8 text", "byte 0xff at line 1", "UTF-16"]),
        (bytes(range(256)) * 8, ["is not UTF-8 text", "byte 0x80", "is this the right file?"]),
        (b"teacher: {model: /m}\n\xc3(\n", ["is not UTF-8 text", "at line 2"]),
        (b'teacher: {model: "/m\x00"}\n', ["not valid YAML", "line 1, column 21", "0x0000", "binary data"]),
        (b"teacher:\n  model: x\x07y\n", ["not valid YAML", "line 2, column 11", "0x0007"]),
    ],
    ids=["utf16", "random-bytes", "bad-utf8", "nul", "control-char"],
)
def test_binary_files_are_refused(tmp_path, yaml_loader, data, needles):
    refused(tmp_path, data, *needles)


def test_python_tags_are_refused_and_never_run(tmp_path, yaml_loader):
    marker = tmp_path / "ran"
    for tag in (
        f"!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object:os.system {}",
        "!!python/name:os.system ''",
        "!!python/tuple [1, 2]",
    ):
        refused(tmp_path, f"teacher: {{model: {tag}}}\n", "cannot be loaded", "line 1, column 18", "!!python")
    assert not marker.exists()


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass the path of a YAML file"):
        load_spec(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(str(tmp_path / "missing" / "x.yaml"))
    with pytest.raises(ConfigError, match="does not exist|cannot be read"):
        load_spec("nul\0byte.yaml")
    if Path("/dev/null").exists():
        with pytest.raises(ConfigError, match="not a regular file"):
            load_spec("/dev/null")


@pytest.mark.parametrize(
    "text, needles",
    [
        ("1: x\n" + VALID, ["mixes string and integer keys"]),
        ("1: x\n2: y\n", ["the top level has the key 1 (int), not a field name", "the key 2"]),
        ("{1: x, null: y, a: b}\n", ["has the key None (null)", "name it, or quote it"]),
        ("on: 1\n", ["has the key True (bool)", "yes/no/on/off"]),
        ("1.5: x\n", ["has the key 1.5 (float)", "quote it"]),
        (
            "? [a]\n: b\n",
            ["cannot be loaded", "line 1, column 3", "found unhashable key", "keys are strings"],
        ),
        ("[a]: b\n", ["line 1, column 1", "unhashable"]),
        ("2024-01-01: x\n", ["has the key datetime.date(2024, 1, 1) (date)"]),
        (VALID.replace("{url: /o}", "{url: /o, 7: 8}"), ["output mixes string and integer keys (such as 7)"]),
        (
            VALID + "cluster: {env_vars: {1: a}}\n",
            ["cluster.env_vars has the key 1: its key must be a string"],
        ),
    ],
)
def test_keys_that_are_not_strings_never_crash(tmp_path, yaml_loader, text, needles):
    refused(tmp_path, text, *needles)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, yaml_loader):
    refused(
        tmp_path,
        VALID + "teacher: {model: /n}\n",
        "repeats the key 'teacher'",
        "line 4, column 1",
        "first at line 1",
    )
    refused(tmp_path, "teacher: {model: /m, model: /n}\n", "repeats the key 'model'", "line 1, column 22")
    # "1" and 1 are different keys (mixed, so refused for that); a merge key may bring in a
    # key that the mapping then sets.
    mixed = refused(tmp_path, VALID.replace("model: /m", "model: /m, engine_args: {'1': a, 1: b}"), "mixes")
    assert "repeats" not in str(mixed)
    path = tmp_path / "ok.yaml"
    path.write_text("x: &x {url: /p}\n" + VALID.replace("output: {url: /o}", "output: {<<: *x, url: /o}"))
    with pytest.raises(ConfigError) as info:
        load_spec(str(path))
    assert info.value.errors == [
        "x is not a known field; expected one of: " + ", ".join(f.name for f in dataclasses.fields(JobSpec))
    ]


@pytest.mark.parametrize(
    "edit, needles",
    [
        ("labels: {k: 18446744073709551616}", ["labels.k must be an integer that fits in 64 bits"]),
        (
            "labels: {k: " + "9" * 5000 + "}",
            ["cannot be loaded", "line 4, column 13", "5,000 characters is too long"],
        ),
        ("labels: {k: " + "1:" * 100_000 + "1}", ["too long"]),  # base 60: quadratic in PyYAML
        ("labels: {k: .inf}", ["labels.k must be an integer, got inf"]),
        ("labels: {k: .nan}", ["labels.k must be an integer, got nan"]),
        ("labels: {draw_temperature: .nan}", ["labels.draw_temperature must be a finite number, got nan"]),
        ("labels: {draw_temperature: -.inf}", ["must be a finite number, got -inf"]),
        (
            "cluster: {resources: {gpu: x, tpu: .inf}}",
            ["cluster.resources.gpu must be a number, got 'x'", "tpu"],
        ),
        ("cluster: {cpus_per_replica: 1.0e+999}", ["must be a finite number, got inf"]),
        ("teacher: {model: /m, revision: 2024-01-01}", ["is a date", "quote it"]),
        ("teacher: {model: /m, revision: 2024-13-45}", ["line 3, column 32", "month must be in 1..12"]),
        ('teacher: {model: "/m\\0"}', ["teacher.model holds a NUL character"]),
        ("teacher: {model: !!binary aGVsbG8=}", ["teacher.model is a bytes", "!!binary"]),
        ("teacher: {model: /m, engine_args: !!set {a, b}}", ["teacher.engine_args is a set", "list instead"]),
    ],
)
def test_values_that_are_not_plain_or_do_not_fit(tmp_path, yaml_loader, edit, needles):
    section = edit.split(":")[0]
    base = "".join(line + "\n" for line in VALID.splitlines() if not line.startswith(section + ":"))
    refused(tmp_path, base + edit + "\n", *needles)


def test_yaml_syntax_errors_give_the_line_and_column(tmp_path, yaml_loader):
    refused(
        tmp_path, "teacher: {model: /m}\ncorpus: [unclosed\n", "not valid YAML", "line 3, column 1", "line 2"
    )
    refused(tmp_path, "teacher: {model: /m}\n  bad: indent\n", "not valid YAML", "line 2, column")
    refused(tmp_path, VALID + "---\n" + VALID, "not valid YAML", "one YAML document")
    refused(tmp_path, "teacher: *nowhere\n", "not valid YAML", "line 1, column 10", "undefined alias")


def test_overrides_get_the_same_protection(tmp_path, yaml_loader):
    path = tmp_path / "spec.yaml"
    path.write_text(VALID)
    bomb = "{" + billion_laughs().replace("\n", ", ").rstrip(", ") + "}"
    cases = [
        (f"teacher.engine_args={bomb}", "alias bomb"),
        ("teacher.engine_args=" + "[" * 100_000, "nested"),
        ("labels.k={unclosed", "not valid YAML"),
        ("labels.k=!!python/object:os.system {}", "!!python"),
        ("teacher.revision=2024-01-01", "quote it"),
        ("labels.k=" + "9" * 5000, "too long"),
        ("labels.k=" + "x" * (MAX_CONFIG_BYTES + 1), "over the"),
        ("labels..k=1", "empty part"),
        ("=1", "must look like dotted.key=value"),
        ("labels.k=\udcff", "not UTF-8"),
        (".".join(["a"] * 200) + "=1", "more than 100 parts"),
        ("labels.k={a: 1, a: 2}", "repeats the key 'a'"),
    ]
    for override, needle in cases:
        with quick(), pytest.raises(ConfigError) as info:
            load_spec(str(path), [override])
        assert needle in str(info.value), (override, str(info.value))
    with pytest.raises(ConfigError, match="conflicts with an earlier override"):
        parse_overrides(["labels=3", "labels.k=4"])


def test_load_config_measures_python_mappings_too():
    shared = ["x"] * 1000
    wide = [shared] * 1000
    with quick(), pytest.raises(ConfigError, match="alias bomb"):
        load_config(JobSpec, {**MINIMAL, "teacher": {"model": "/m", "engine_args": {"w": wide}}})
    loop: list = []
    loop.append(loop)
    with pytest.raises(ConfigError, match="contains itself"):
        load_config(JobSpec, {**MINIMAL, "teacher": {"model": "/m", "engine_args": {"loop": loop}}})
    with pytest.raises(ConfigError, match="teacher.engine_args.p is a PosixPath|is a WindowsPath"):
        load_config(JobSpec, {**MINIMAL, "teacher": {"model": "/m", "engine_args": {"p": Path("/x")}}})
    huge = 10**5000
    with pytest.raises(
        ConfigError, match="labels.k must be an integer that fits in 64 bits, got <an integer"
    ):
        load_config(JobSpec, {**MINIMAL, "labels": {"k": huge}})


def test_a_rule_that_raises_is_reported_as_a_problem():
    @dataclasses.dataclass(frozen=True)
    class Fragile:
        url: str

        def check(self):
            yield "url", "is checked first"
            raise ValueError("Invalid IPv6 URL")

    with pytest.raises(ConfigError) as info:
        load_config(Fragile, {"url": "s3://[x"})
    assert info.value.errors == [
        "url is checked first",
        "the top level could not be checked: its rules raised ValueError ('Invalid IPv6 URL') on this "
        "config; a value here is probably malformed (please report it)",
    ]


def test_error_messages_stay_short_on_huge_values(tmp_path):
    many = {**MINIMAL, "hidden": {"layers": ["x"] * 5000}, "teacher": {"model": ["y" * 10_000] * 50}}
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, many)
    assert len(info.value.errors) == 5001
    assert len(str(info.value)) < 20_000
    assert "... and 4,951 more" in str(info.value)


def test_the_example_configs_load(yaml_loader):
    root = Path(__file__).resolve().parent.parent / "manifests"
    for path in sorted((root / "jobs").glob("*.yaml")):
        assert isinstance(load_spec(str(path)), JobSpec)
    for path in sorted((root / "students").glob("*.yaml")):
        assert isinstance(load_config_file(TrainConfig, path), TrainConfig)
