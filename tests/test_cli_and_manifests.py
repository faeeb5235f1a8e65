"""CLI surfaces (pinned --help), every shipped manifest validated, README commands present.

Cluster manifests (KubeRay ``RayJob``, Kubernetes ``Job``, the catalog service's
``Deployment`` + ``Service``) are checked for the fields their kind requires, and every
job spec or student config they carry in a ConfigMap is validated like a file under
manifests/jobs or manifests/students.
"""

from __future__ import annotations

import argparse
import re
import shlex
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
    for verb in ("validate", "run", "run-ray", "submit", "status", "logs", "stop", "inspect"):
        assert f"    {verb} " in text, verb
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


CLUSTER_MANIFESTS = sorted((REPO / "manifests" / "kuberay").glob("*.yaml")) + sorted(
    (REPO / "manifests" / "k8s").glob("*.yaml")
)


def _containers(pod_template: dict, where: str) -> list[dict]:
    containers = pod_template.get("spec", {}).get("containers") or []
    assert containers, f"{where}: template.spec.containers is required"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: every container needs name and image"
    return containers


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _mounted_files(pod_template: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    """Absolute paths of ConfigMap keys mounted into the pod → their text."""
    volumes = {v["name"]: v for v in pod_template["spec"].get("volumes", [])}
    files = {}
    for c in pod_template["spec"]["containers"]:
        for mount in c.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            assert volume is not None, f"volumeMount {mount['name']!r} has no volume"
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                assert name in configmaps, f"ConfigMap {name!r} is not defined in the same file"
                for key, text in configmaps[name]["data"].items():
                    files[f"{mount['mountPath'].rstrip('/')}/{key}"] = text
    return files


def _check_embedded(text: str, tmp_path: Path, name: str) -> str:
    """Validate an embedded job spec or student config; returns its kind."""
    data = yaml.safe_load(text)
    path = tmp_path / name
    path.write_text(text)
    if "teacher" in data:
        load_spec(str(path))
        assert labelgen_cli.main(["validate", str(path)]) == 0
        return "job"
    load_train_config(str(path))
    assert students_cli.main(["validate", str(path)]) == 0
    return "student"


@pytest.mark.parametrize("path", CLUSTER_MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cluster_manifests_validate(path, tmp_path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    embedded = {}
    for cm in configmaps.values():
        assert cm["apiVersion"] == "v1" and cm.get("data"), f"{path}: ConfigMap needs data"
        for key, text in cm["data"].items():
            embedded[key] = _check_embedded(text, tmp_path, key)
    if path.parent.name == "kuberay":
        assert "RayJob" in kinds, f"{path}: a KubeRay manifest runs a RayJob"
    else:
        assert kinds & {"Job", "Deployment"}, f"{path}: a Kubernetes manifest here runs a Job or a service"
    for doc in docs:
        if doc["kind"] == "RayJob":
            assert doc["apiVersion"] == "ray.io/v1"
            spec = doc["spec"]
            argv = shlex.split(spec["entrypoint"])
            assert argv[:2] == ["labelgen", "run-ray"], "the RayJob runs the labeling driver"
            cluster = spec["rayClusterSpec"]
            head = cluster["headGroupSpec"]["template"]
            _containers(head, f"{path} head")
            files = _mounted_files(head, configmaps)
            assert argv[2] in files, f"{path}: entrypoint spec {argv[2]} is not mounted from a ConfigMap"
            job = load_spec(str(tmp_path / Path(argv[2]).name))
            workers = cluster["workerGroupSpecs"]
            assert workers, f"{path}: needs GPU worker groups"
            total_gpus = 0
            for group in workers:
                assert group.get("groupName") and group.get("replicas", 0) >= 1
                gpus = max(_gpus(c) for c in _containers(group["template"], f"{path} {group['groupName']}"))
                assert gpus >= 1, f"{path}: worker group {group['groupName']} has no GPUs"
                total_gpus += gpus * group["replicas"]
            per_replica = job.gpus_per_replica(cluster_has_gpus=True)
            assert per_replica >= job.model_parallel_size()
            assert job.cluster.replicas * per_replica <= total_gpus, (
                f"{path}: {job.cluster.replicas} replicas x {per_replica} GPUs exceed {total_gpus} GPUs"
            )
        elif doc["kind"] == "Job":
            assert doc["apiVersion"] == "batch/v1"
            template = doc["spec"]["template"]
            assert template["spec"].get("restartPolicy") in {"Never", "OnFailure"}
            (container,) = _containers(template, str(path))
            assert _gpus(container) >= 1, f"{path}: the student trains on a GPU node"
            argv = container.get("command", []) + container.get("args", [])
            assert argv[:2] == ["students", "train"], "the Job runs the student trainer"
            files = _mounted_files(template, configmaps)
            assert argv[2] in files, f"{path}: {argv[2]} is not mounted from a ConfigMap"
            assert embedded[Path(argv[2]).name] == "student"
            cfg = load_train_config(str(tmp_path / Path(argv[2]).name))
            assert (cfg.data.url or "").startswith("s3://"), "the student reads the labels' shard URL"
        elif doc["kind"] == "Deployment":
            _check_catalog_deployment(doc, path)
        elif doc["kind"] == "Service":
            _check_service(doc, docs, path)
        else:
            assert doc["kind"] == "ConfigMap", f"{path}: unexpected kind {doc['kind']}"


def _documented_secrets(text: str) -> dict[str, set[str]]:
    """The Secrets a manifest's comments tell how to create (``kubectl create secret
    generic NAME --from-literal=KEY=...``, continued lines joined) → their keys."""
    comments = "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
    secrets: dict[str, set[str]] = {}
    for command in re.sub(r"\\\n", " ", comments).splitlines():
        named = re.search(r"kubectl create secret generic ([\w.-]+)", command)
        if named:
            keys = re.findall(r"--from-(?:literal|file)=([\w.-]+)=", command)
            secrets.setdefault(named.group(1), set()).update(keys)
    return secrets


def _container_port(container: dict, port, where: str) -> int:
    """A probe's or Service's port (a number or a port name) as one of the container's ports."""
    ports = {p["containerPort"]: p for p in container.get("ports", [])}
    by_name = {p["name"]: n for n, p in ports.items() if p.get("name")}
    if isinstance(port, str) and not port.isdigit():
        assert port in by_name, f"{where}: port {port!r} is not a named port of {container['name']}"
        return by_name[port]
    assert int(port) in ports, f"{where}: port {port} is not a containerPort of {container['name']}"
    return int(port)


def _check_catalog_deployment(doc: dict, path: Path) -> None:
    """The catalog service: `labelgen serve`, configured from a documented Secret."""
    where = f"{path} Deployment {doc['metadata']['name']}"
    assert doc["apiVersion"] == "apps/v1"
    spec = doc["spec"]
    assert spec.get("replicas", 1) >= 1
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), f"{where}: selector misses the pods"
    (container,) = _containers(template, where)
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["labelgen", "serve"], f"{where}: the Deployment runs the catalog service"
    if "--port" in argv:
        _container_port(container, argv[argv.index("--port") + 1], f"{where} --port")
    env = {e["name"]: e for e in container.get("env", [])}
    if "--db" not in argv:
        assert "LABELGEN_DB" in env, f"{where}: without --db the service needs LABELGEN_DB"
    documented = _documented_secrets(path.read_text())
    for name, entry in env.items():
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["key"] in documented.get(ref["name"], set()), (
                f"{where}: {name} reads key {ref['key']!r} of Secret {ref['name']!r}, "
                f"which the comments do not say how to create (they describe {documented})"
            )
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            assert source["secretRef"]["name"] in documented, f"{where}: envFrom {source} is not documented"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            assert kind == "startupProbe", f"{where}: needs a {kind}"
            continue
        assert probe["httpGet"]["path"] == "/health", f"{where}: {kind} checks GET /health"
        _container_port(container, probe["httpGet"]["port"], f"{where} {kind}")
    resources = container.get("resources", {})
    assert resources.get("requests") and resources.get("limits"), f"{where}: set resources"
    security = {**template["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    assert security.get("runAsNonRoot") is True, f"{where}: the service runs as a non-root user"


def _check_service(doc: dict, docs: list[dict], path: Path) -> None:
    """A Service in front of a Deployment of the same file, on one of its container's ports."""
    where = f"{path} Service {doc['metadata']['name']}"
    assert doc["apiVersion"] == "v1"
    spec = doc["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    selector = spec["selector"]
    targets = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert targets, f"{where}: selects no Deployment of this file"
    assert spec["ports"], f"{where}: needs ports"
    for deployment in targets:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for port in spec["ports"]:
            _container_port(container, port.get("targetPort", port["port"]), f"{where} port {port['port']}")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


SERVICE_DEPLOYMENTS = [
    (path, doc)
    for path in CLUSTER_MANIFESTS
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc["kind"] == "Deployment"
]


@pytest.mark.parametrize(
    ("path", "doc"),
    SERVICE_DEPLOYMENTS,
    ids=[f"{p.name}:{d['metadata']['name']}" for p, d in SERVICE_DEPLOYMENTS],
)
def test_service_deployments_run_flags_labelgen_serve_accepts(path, doc):
    parser = labelgen_cli.build_parser()
    if "serve" not in _subcommands(parser):
        pytest.skip("`labelgen serve` is not in the CLI yet")
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert argv[0] == "labelgen"
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{path}: `labelgen serve --help` does not accept {shlex.join(argv)} (exit {exc.code})")
    ports = {p["containerPort"] for p in container["ports"]}
    if getattr(args, "port", None) is not None:
        assert int(args.port) in ports, f"{path}: serves on {args.port}, the container exposes {ports}"
    if getattr(args, "host", None) is not None:
        assert args.host == "0.0.0.0", f"{path}: the service must listen on all interfaces in a pod"


def test_catalog_service_manifest_is_shipped():
    assert SERVICE_DEPLOYMENTS, "manifests/k8s/catalog-service.yaml runs `labelgen serve`"
    documented = _documented_secrets((REPO / "manifests" / "k8s" / "catalog-service.yaml").read_text())
    assert documented["labelgen-catalog"] == {"database-url", "admin-token", "signing-key"}


def test_example_job_specs_cover_8b_and_70b_on_s3():
    specs = {p.name: load_spec(str(p)) for p in (REPO / "manifests" / "jobs").glob("*.yaml")}
    parallel = sorted(s.model_parallel_size() for s in specs.values())
    assert 1 in parallel and 8 in parallel, "an 8B (TP 1) and a 70B (TP 8) teacher are shipped"
    assert any(s.output.url.startswith("s3://") and s.model_parallel_size() == 8 for s in specs.values())


def test_every_manifest_is_covered():
    covered = {"jobs", "students", "kuberay", "k8s"}
    validated = set(CLUSTER_MANIFESTS)
    for path in (REPO / "manifests").rglob("*"):
        if path.is_dir():
            continue
        assert path.suffix == ".yaml", f"{path}: manifests are .yaml files"
        assert path.parent.name in covered, f"{path} is not validated by any test"
        if path.parent.name in {"kuberay", "k8s"}:
            assert path in validated, f"{path} is not validated by test_cluster_manifests_validate"
        list(yaml.safe_load_all(path.read_text()))


def test_readme_gives_the_two_commands_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    assert "bash examples/demo.sh" in readme
    test_command = "bash scripts/test.sh"
    assert test_command in readme
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_cluster_section_is_validated_and_not_part_of_the_spec_hash(tmp_path):
    from labelgen.contract.configs import ConfigError, load_config
    from labelgen.spec import JobSpec

    base = {
        "teacher": {"model": "/m", "engine_args": {"tensor_parallel_size": 8}},
        "corpus": {"sources": ["s3://b/c/*.jsonl"]},
        "output": {"url": "s3://b/labels"},
    }
    spec = load_config(JobSpec, base)
    assert spec.gpus_per_replica(cluster_has_gpus=True) == 8 and spec.gpus_per_replica(False) == 0
    resized = load_config(JobSpec, {**base, "cluster": {"replicas": 16, "gpus_per_replica": 8}})
    assert resized.content_hash() == spec.content_hash(), "resuming with more replicas must be allowed"
    bad = {**base, "cluster": {"replicas": 0, "gpus_per_replica": 4, "max_unit_attempts": 0}}
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, bad)
    text = str(info.value)
    assert "cluster.replicas must be >= 1, got 0" in text
    assert "cluster.gpus_per_replica (4.0) is fewer than" in text and "set it to 8" in text
    assert "cluster.max_unit_attempts must be >= 1" in text
    secret = {**base, "cluster": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "abc"}}}
    with pytest.raises(ConfigError, match="cluster.env_vars.AWS_SECRET_ACCESS_KEY looks like a credential"):
        load_config(JobSpec, secret)


def test_ray_commands_without_ray_give_the_install_line(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    from labelgen.cluster import import_ray

    with pytest.raises(ImportError, match=r"pip install 'labelgen\[ray\]'"):
        import_ray()
    assert labelgen_cli.main(["status", "raysubmit_x", "--address", "http://127.0.0.1:1"]) == 2
    assert "pip install 'labelgen[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "overrides"),
    [
        (["run", "s.yaml", "--no-progress", "labels.k=8"], ["labels.k=8"]),
        (["run", "s.yaml", "a.b=1", "--no-progress", "c=2"], ["a.b=1", "c=2"]),
        (["run", "--no-progress", "s.yaml", "labels.k=8"], ["labels.k=8"]),
        (["validate", "s.yaml", "labels.k=8", "output.url=/o"], ["labels.k=8", "output.url=/o"]),
        (["run-ray", "s.yaml", "--address", "auto", "cluster.replicas=2"], ["cluster.replicas=2"]),
        (
            ["submit", "s.yaml", "--address", "http://h:8265", "cluster.replicas=4", "--job-id", "j", "x=-1"],
            ["cluster.replicas=4", "x=-1"],
        ),
    ],
)
def test_labelgen_overrides_may_follow_flags(argv, overrides):
    from labelgen.contract.configs import parse_cli_args

    args = parse_cli_args(labelgen_cli.build_parser(), argv)
    assert args.spec == "s.yaml" and args.overrides == overrides


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [
        (["run", "s.yaml", "--no-progress", "stray"], "stray"),
        (["run", "s.yaml", "--bogus=1", "labels.k=8"], "--bogus=1"),
        (["inspect", "/data", "labels.k=8"], "labels.k=8"),
        (["status", "raysubmit_x", "--address", "http://h:8265", "a=1"], "a=1"),
    ],
)
def test_labelgen_refuses_other_leftovers_as_argparse_does(argv, unknown, capsys):
    with pytest.raises(SystemExit) as info:
        labelgen_cli.main(argv)
    assert info.value.code == 2
    assert f"labelgen: error: unrecognized arguments: {unknown}" in capsys.readouterr().err


def test_labelgen_run_applies_an_override_given_after_a_flag(capsys):
    spec = REPO / "manifests" / "jobs" / "tiny-cpu.yaml"
    assert labelgen_cli.main(["run", str(spec), "--no-progress", "labels.k=0"]) == 2
    assert "labels.k must be >= 1, got 0" in capsys.readouterr().err


def test_students_overrides_anywhere_after_the_config(capsys):
    from labelgen.contract.configs import parse_cli_args

    parser = students_cli.build_parser()
    for verb in ("validate", "train", "eval"):
        args = parse_cli_args(parser, [verb, "c.yaml", "optim.lr=1e-3", "train.output_dir=/o"])
        assert args.config == "c.yaml" and args.overrides == ["optim.lr=1e-3", "train.output_dir=/o"]
    config = REPO / "manifests" / "students" / "tiny-cpu.yaml"
    assert students_cli.main(["validate", str(config), "train.output_dir=/tmp/elsewhere"]) == 0
    assert "/tmp/elsewhere" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        students_cli.main(["train", str(config), "--bogus", "optim.lr=1e-3"])
    assert info.value.code == 2
    assert "students: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_validate_names_the_codec_and_what_it_stores(capsys):
    from labelgen.contract.codecs import get_codec

    spec = REPO / "manifests" / "jobs" / "tiny-cpu.yaml"
    assert labelgen_cli.main(["validate", str(spec), "labels.codec=compact-v2"]) == 0
    assert f"top-k codec compact-v2: {get_codec('compact-v2').summary}" in capsys.readouterr().out
