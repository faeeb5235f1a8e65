"""CLI surfaces (pinned --help), every shipped manifest validated, README commands present."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from labelgen import cli as labelgen_cli
from labelgen.spec import load_spec
from students import cli as students_cli
from students.config import load_train_config

REPO = Path(__file__).resolve().parent.parent


def help_text(parser) -> str:
    return parser.format_help()


def test_labelgen_help_lists_the_verbs():
    text = help_text(labelgen_cli.build_parser())
    for verb in ("validate", "run", "inspect"):
        assert verb in text
    with pytest.raises(SystemExit) as info:
        labelgen_cli.main(["--help"])
    assert info.value.code == 0


def test_students_help_lists_the_verbs():
    text = help_text(students_cli.build_parser())
    for verb in ("validate", "train", "eval"):
        assert verb in text


@pytest.mark.parametrize("path", sorted((REPO / "manifests" / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_manifests_validate(path):
    spec = load_spec(str(path))
    assert spec.labels.k >= 1
    assert labelgen_cli.main(["validate", str(path)]) == 0


@pytest.mark.parametrize(
    "path", sorted((REPO / "manifests" / "students").glob("*.yaml")), ids=lambda p: p.name
)
def test_student_manifests_validate(path):
    cfg = load_train_config(str(path))
    assert students_cli.main(["validate", str(path)]) == 0
    assert cfg.data.url


def test_every_manifest_is_covered():
    covered = {"jobs", "students"}
    for path in (REPO / "manifests").rglob("*.yaml"):
        assert path.parent.name in covered, f"{path} is not validated by any test"
        yaml.safe_load(path.read_text())


def test_readme_gives_the_two_commands_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    assert "bash examples/demo.sh" in readme
    test_command = "bash scripts/test.sh"
    assert test_command in readme
    assert test_command in (REPO / ".ci" / "run").read_text()
