"""Typed YAML configs: unknown keys, types, rules, overrides, all errors at once."""

from __future__ import annotations

import pytest

from labelgen.contract.configs import ConfigError, load_config, parse_overrides
from labelgen.spec import JobSpec, load_spec
from students.config import TrainConfig

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
