"""The package layout docs/architecture.md describes: no import cycles, modules of a readable size."""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cvt_deploy"
ROOT = PACKAGE.name
MAX_LINES = 450
REGISTRY = re.compile(r"cvt_deploy(\.\w+)+:\w+")  # "module:Class", imported by importlib


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """cvt_deploy modules that ``name`` imports anywhere: at the top, inside functions (lazy),
    and under TYPE_CHECKING (a module that needs another's types depends on it as much); the
    ``__init__`` of each subpackage it reaches into from outside (Python runs it first); and the
    modules named in registry strings (``"cvt_deploy.runtimes.ort:OrtRuntime"``), imported by name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTRY.fullmatch(node.value):
            candidates = [node.value.split(":")[0]]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in modules and candidate not in (name, ROOT):  # the root package: the import of anything
                out.add(candidate)
            # Reaching into a subpackage from outside it runs its __init__ first (the root package's
            # is the import of anything: not counted). From inside, its __init__ is already running.
            parts = candidate.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent != name and not name.startswith(parent + "."):
                    out.add(parent)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def _graph(package: Path) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles() -> None:
    graph = _graph(PACKAGE)
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    ground = {"cvt_deploy.errors", "cvt_deploy.interrupt"}  # each imports nothing of cvt-deploy
    assert not any(graph[m] for m in ground)
    assert "cvt_deploy.util" in graph and not graph["cvt_deploy.util"] - ground, \
        "the ground floor imports nothing of cvt-deploy but errors and interrupt"


@pytest.mark.parametrize("how", ["lazy", "absolute", "type-checking"])
def test_a_planted_cycle_is_found(tmp_path: Path, how: str) -> None:
    """The check above sees every way one module can reach another."""
    shutil.copytree(PACKAGE, tmp_path / "cvt_deploy", ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.npz",
                                                                                    "*.safetensors", "*.png"))
    # cvt_deploy.bench.results imports cvt_deploy.table: each plant makes table import it back.
    plant = {"lazy": "\n\ndef _planted():\n    from .bench.results import BenchResult\n\n    return BenchResult\n",
             "absolute": "\nimport cvt_deploy.bench.results  # noqa: E402\n",
             "type-checking": "\nfrom typing import TYPE_CHECKING  # noqa: E402\n\nif TYPE_CHECKING:\n"
                              "    from .bench.results import BenchResult  # noqa: F401\n"}[how]
    table = tmp_path / "cvt_deploy" / "table.py"
    assert not _cycles(_graph(tmp_path / "cvt_deploy")), "the copy has a cycle before any plant"
    table.write_text(table.read_text() + plant)
    cycles = _cycles(_graph(tmp_path / "cvt_deploy"))
    assert any({"cvt_deploy.table", "cvt_deploy.bench.results"} <= set(c) for c in cycles), cycles


def test_modules_stay_readable() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by concept): {long}"


@pytest.mark.parametrize("how", ["package-init", "registry-string"])
def test_a_cycle_hidden_behind_a_package_init_or_a_registry_string_is_found(tmp_path: Path, how: str) -> None:
    """The cycle the first layout check missed: runtimes.choice timed CPU paths with bench.timing,
    whose package's __init__ imports bench.run, which asks runtimes.choice for the fastest path; and
    a backend named by string in a registry that the backend's own module imports."""
    shutil.copytree(PACKAGE, tmp_path / "cvt_deploy", ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.npz",
                                                                                    "*.safetensors", "*.png"))
    target, plant, expected = {
        "package-init": ("runtimes/choice.py", "\n\ndef _planted():\n    from ..bench.timing import Case\n\n    return Case\n",
                         {"cvt_deploy.runtimes.choice", "cvt_deploy.bench", "cvt_deploy.bench.run"}),
        "registry-string": ("table.py", '\n_PLANTED = {"results": "cvt_deploy.bench.results:BenchResult"}\n',
                            {"cvt_deploy.table", "cvt_deploy.bench.results"}),
    }[how]
    path = tmp_path / "cvt_deploy" / target
    assert not _cycles(_graph(tmp_path / "cvt_deploy")), "the copy has a cycle before any plant"
    path.write_text(path.read_text() + plant)
    cycles = _cycles(_graph(tmp_path / "cvt_deploy"))
    assert any(expected <= set(c) for c in cycles), cycles
