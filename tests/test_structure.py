"""House rules the code keeps: import boundaries, no import cycles, one home per rule.

Read from the source (``ast``), not by importing it: a rule broken in a module no test
imports is still found.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO
from labelgen.contract.codecs import CODEC_NAMES

PACKAGES = ("labelgen", "students")
CODE_DIRS = (*PACKAGES, "bench", "examples")


def _files(*dirs: str) -> Iterator[Path]:
    for name in dirs:
        yield from sorted((REPO / name).rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, known: set[str]) -> set[str]:
    """Project modules a module imports anywhere (top level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if child in known:
                    found.add(child)
                elif node.module in known:
                    found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module(p): p for p in _files(*PACKAGES)}
    known = set(paths)
    return {name: _imports(ast.parse(path.read_text()), known) - {name} for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles_in_labelgen_or_students():
    graph = _graph()
    assert "students.loader" in graph and "labelgen.contract.codecs" in graph  # the walk found the code
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_students_import_only_the_contract_and_the_catalog_client_from_labelgen():
    light = ("labelgen.contract", "labelgen.catalog")
    for name, imported in _graph().items():
        if name.startswith("students"):
            outside = sorted(m for m in imported if m.startswith("labelgen") and not m.startswith(light))
            assert not outside, (
                f"{name} imports {outside}; students may use labelgen.contract and labelgen.catalog"
            )


def test_the_catalog_client_imports_only_the_contract():
    for name, imported in _graph().items():
        if name.startswith("labelgen.catalog"):
            outside = sorted(
                m for m in imported if not m.startswith(("labelgen.contract", "labelgen.catalog"))
            )
            assert not outside, f"{name} imports {outside}; the client may use labelgen.contract only"


def test_the_web_framework_and_the_database_layer_stay_in_the_service():
    homes = {
        ("fastapi", "starlette", "uvicorn", "anyio"): {
            "labelgen.service.app",
            "labelgen.service.server",
            "labelgen.service.routes_trust",
            "labelgen.service.routes_runs",
            "labelgen.service.routes_jobs",
            "labelgen.service.web",
        },
        ("sqlalchemy", "alembic"): {
            "labelgen.service.db",
            "labelgen.service.store",
            "labelgen.service.trust",
            "labelgen.service.runs",
            "labelgen.service.jobs",
            "labelgen.service.tracker",
            "labelgen.service.migrations",
        },
    }
    for libraries, allowed in homes.items():
        importers = _importers(*libraries)
        outside = {m for m in importers if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not outside, (libraries, outside)
        assert importers, libraries  # the walk found them


def test_the_contract_imports_nothing_else_from_the_project():
    for name, imported in _graph().items():
        if name.startswith("labelgen.contract"):
            assert all(m.startswith("labelgen.contract") for m in imported), (name, imported)


def test_contract_and_students_stream_import_no_heavy_libraries():
    code = (
        "import sys, labelgen.contract, labelgen.spec, students, students.config, students.stream\n"
        "import labelgen.catalog.fs, labelgen.catalog.commands\n"
        "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers', 'fastapi', 'sqlalchemy', 'uvicorn')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _importers(*libraries: str) -> set[str]:
    """Project modules that import any of ``libraries`` (or their submodules), anywhere."""
    importers = set()
    for path in _files(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] in libraries for n in names):
                importers.add(_module(path))
    return importers


def test_vllm_and_ray_are_each_imported_in_one_module():
    for library, home in (("vllm", "labelgen.teacher_vllm"), ("ray", "labelgen.cluster")):
        # The worker extension also names the vLLM runner class it patches, inside vLLM's
        # worker (labelgen.extraction.install_aux_patch); it imports nothing else of vLLM.
        allowed = {home, "labelgen.extraction"} if library == "vllm" else {home}
        assert home in _importers(library) <= allowed, library
    source = (Path(__file__).parent.parent / "labelgen" / "extraction.py").read_text()
    assert source.count("from vllm") == 1 and "import vllm" not in source


def _code_strings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, value) of every string constant that is code, not documentation."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_codec_name_outside_the_codec_registry():
    """Every place that writes, reads or describes top-k columns asks the registry."""
    registry = REPO / "labelgen" / "contract" / "codecs"
    found = [
        f"{path.relative_to(REPO)}:{line} {value!r}"
        for path in [*_files(*PACKAGES, "examples"), REPO / "bench" / "codec.py"]
        if registry not in path.parents
        for line, value in _code_strings(path)
        if value in CODEC_NAMES
    ]
    assert not found, "codec names belong to labelgen/contract/codecs: " + ", ".join(found)


def test_nobody_but_the_commit_log_parses_commits():
    """Only labelgen/contract/commits.py knows the log's directory and record names (the
    directory's name is defined with the rest of the layout in labelgen/contract/format.py)."""
    home = REPO / "labelgen" / "contract" / "commits.py"
    layout = REPO / "labelgen" / "contract" / "format.py"
    names = ("sources.json", "job.json", "tokenizer.json", "teacher.json")
    found = []
    for path in _files(*CODE_DIRS):
        if path == home:
            continue
        text = path.read_text()
        if "COMMITS_DIR" in text and path != layout:
            found.append(f"{path.relative_to(REPO)} uses COMMITS_DIR")
        for line, value in _code_strings(path):
            if path == layout and value == "_commits" and 'COMMITS_DIR = "_commits"' in text:
                continue
            if "_commits" in value or value in names or value.startswith("unit-"):
                found.append(f"{path.relative_to(REPO)}:{line} {value!r}")
    assert not found, "the commit log is labelgen/contract/commits.py: " + ", ".join(found)
