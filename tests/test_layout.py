"""The package layout docs/architecture.md describes: every module on a floor of its table, no
import up a floor, no import cycles, modules of a readable size."""
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
    return set(_imports_at(name, path, modules))


def _imports_at(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """:func:`_imports`, each with the first line that imports it (for a message one can act on)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        out[target] = min(line, out.get(target, line))

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
                add(candidate, node.lineno)
            # Reaching into a subpackage from outside it runs its __init__ first (the root package's
            # is the import of anything: not counted). From inside, its __init__ is already running.
            parts = candidate.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent != name and not name.startswith(parent + "."):
                    add(parent, node.lineno)
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
    # util is what everything imports: none of ALLOWED_UPWARD's exceptions may ever apply to it.
    _, floor_of, _ = _floors()
    assert "cvt_deploy.util" in graph and all(floor_of.get(m) == 0 for m in graph["cvt_deploy.util"]), \
        "util imports nothing of cvt-deploy but the ground floor of docs/architecture.md's table"


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


# -- floors: docs/architecture.md's table, bottom to top ----------------------------------------
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
TABLE_HEADER = "| layer | module | owns |"

# Upward imports the table allows as exceptions: (importer, imported) -> why it is there and what
# removes it. None today; an entry the code no longer has fails the test, so the list cannot go stale.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
}


def _floors(doc: Path = ARCHITECTURE, package: Path = PACKAGE) -> tuple[list[str], dict[str, int], list[str]]:
    """The table's floors in order, the floor of each module it places, and what is wrong with the
    table itself. A row's first cell names its floor (empty: the floor above); its second names
    modules in backticks: a file, a folder (``deepstream/``) or a glob (``cli/*.py``), a file
    winning over a folder or glob that also covers it. A subpackage's ``__init__`` the table does
    not place sits on the lowest floor of its modules: Python runs it before any of them."""
    lines = doc.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == TABLE_HEADER), None)
    if start is None:
        return [], {}, [f"{doc.name} has no table {TABLE_HEADER!r}"]
    modules = _modules(package)
    by_path = {path: name for name, path in modules.items()}
    names: list[str] = []
    named: dict[str, set[int]] = {}  # a file
    covered: dict[str, set[int]] = {}  # a folder or glob
    faults = []
    for line in lines[start + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        _, floor, cell, _ = line.split("|", 3)  # the owns column may hold "|" of its own
        if floor.strip():
            if floor.strip() in names:
                faults.append(f"floor {floor.strip()!r} appears twice: its rows belong together")
            names.append(floor.strip())
        elif not names:
            faults.append("the table's first row names no floor")
            continue
        for entry in re.findall(r"`([^`]+)`", cell):
            if entry.endswith("/") or "*" in entry:
                paths = sorted(package.glob(entry + "**/*.py" if entry.endswith("/") else entry))
                into = covered
            else:
                paths = [package / entry] if (package / entry).is_file() else []
                into = named
            if not paths:
                faults.append(f"`{entry}` ({floor.strip() or names[-1]}) names nothing in {package.name}/")
            for path in paths:
                if path in by_path:
                    into.setdefault(by_path[path], set()).add(len(names) - 1)
    floor_of = {name: min(floors) for name, floors in covered.items()}
    floor_of.update((name, min(floors)) for name, floors in named.items())
    faults += [f"{name} sits on two floors: {', '.join(names[f] for f in sorted(floors))}"
               for placed in (named, covered) for name, floors in sorted(placed.items())
               if len(floors) > 1 and not (placed is covered and name in named)]
    for name, path in sorted(modules.items()):
        if path.name == "__init__.py" and name != package.name and name not in floor_of:
            inside = [f for m, f in floor_of.items() if m.startswith(name + ".")]
            if inside:
                floor_of[name] = min(inside)
    return names, floor_of, faults


def _upward(package: Path, floors: list[str], floor_of: dict[str, int]) -> dict[tuple[str, str], str]:
    """Every import that goes up a floor (the same floor is fine), with its message. The root
    package is the public face, which may import anything (as the cycle check counts it)."""
    modules = _modules(package)
    out = {}
    for name, path in sorted(modules.items()):
        if name == package.name or name not in floor_of:
            continue
        for target, line in sorted(_imports_at(name, path, modules).items()):
            if target in floor_of and floor_of[target] > floor_of[name]:
                out[(name, target)] = (f"{name} ({floors[floor_of[name]]}) -> {target} "
                                       f"({floors[floor_of[target]]}) at line {line}")
    return out


def _floor_faults(package: Path, doc: Path, allowed: dict[tuple[str, str], str]) -> tuple[list[str], list[str]]:
    """The upward imports not allowed, and the allowed ones the code no longer has."""
    floors, floor_of, _ = _floors(doc, package)
    upward = _upward(package, floors, floor_of)
    return ([m for k, m in upward.items() if k not in allowed],
            [f"{a} -> {b}" for a, b in sorted(allowed) if (a, b) not in upward])


def _unplaced(package: Path, doc: Path) -> list[str]:
    _, floor_of, _ = _floors(doc, package)
    return sorted(set(_modules(package)) - set(floor_of) - {package.name})


def test_every_module_has_a_floor() -> None:
    floors, _, faults = _floors()
    assert floors and not faults, f"docs/architecture.md's module table: {'; '.join(faults) or 'no floors'}"
    missing = _unplaced(PACKAGE, ARCHITECTURE)
    assert not missing, (f"modules with no row in docs/architecture.md's table: {', '.join(missing)}; fix: add a row "
                         "to docs/architecture.md (on the floor of what it imports and what imports it)")


def test_no_import_goes_up_a_floor() -> None:
    upward, stale = _floor_faults(PACKAGE, ARCHITECTURE, ALLOWED_UPWARD)
    assert not upward, ("imports up a floor of docs/architecture.md's table (move the code, or the module's row if "
                        "its floor is wrong):\n  " + "\n  ".join(upward))
    assert not stale, f"ALLOWED_UPWARD lists imports the code no longer has (delete them): {', '.join(stale)}"


FAKE_TABLE = """# Fake

| layer | module | owns |
|---|---|---|
| bottom | `low.py` | what the rest builds on (a `|` inside: not a column) |
| | `sub/__init__.py`, `sub/a.py` | a subpackage on the bottom floor |
| top | `high.py`, `top/` | what sits on it |
| tools | `cli/*.py` | commands |

After the table.
"""


def _fake_package(tmp_path: Path) -> Path:
    """Imports that all go down or stay on their floor, in every way the graph sees one."""
    files = {
        "__init__.py": "from .cli.run import main  # the public face: may import anything\n",
        "low.py": "X = 1\n",
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": "from ..low import X\n",
        "high.py": "from .low import X\nfrom .sub.a import X as Y\n\n\ndef f():\n    from .top import t\n\n    return t\n",
        "top/__init__.py": "",
        "top/t.py": 'import cvt_deploy.high\n\nNAMES = {"low": "cvt_deploy.low:X"}\n',
        "cli/__init__.py": "",
        "cli/run.py": "from ..top.t import NAMES\n\n\ndef main():\n    return NAMES\n",
    }
    package = tmp_path / "cvt_deploy"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    (tmp_path / "architecture.md").write_text(FAKE_TABLE)
    return package


def test_the_fake_table_is_read(tmp_path: Path) -> None:
    package = _fake_package(tmp_path)
    floors, floor_of, faults = _floors(tmp_path / "architecture.md", package)
    assert floors == ["bottom", "top", "tools"] and not faults
    assert floor_of == {"cvt_deploy.low": 0, "cvt_deploy.sub": 0, "cvt_deploy.sub.a": 0, "cvt_deploy.high": 1,
                        "cvt_deploy.top": 1, "cvt_deploy.top.t": 1, "cvt_deploy.cli": 2, "cvt_deploy.cli.run": 2}
    assert _floor_faults(package, tmp_path / "architecture.md", {}) == ([], []), "a downward import was reported"
    assert not _unplaced(package, tmp_path / "architecture.md")


# Each plant: the file it is added to, the text, the module it reaches up to, and on which line.
PLANTS = {
    "lazy": ("low.py", "\n\ndef _planted():\n    from .high import f\n\n    return f\n", "cvt_deploy.high", 5),
    "type-checking": ("sub/a.py", "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                  "    from ..high import f  # noqa: F401\n", "cvt_deploy.high", 5),
    "registry-string": ("low.py", '_PLANTED = {"t": "cvt_deploy.top.t:NAMES"}\n', "cvt_deploy.top.t", 2),
    # reaching into cli.run runs the cli package's __init__ first: that import is up a floor too
    "package-init": ("high.py", "from .cli.run import main  # noqa: E402\n", "cvt_deploy.cli", 9),
}


@pytest.mark.parametrize("how", sorted(PLANTS))
def test_a_planted_upward_import_is_found(tmp_path: Path, how: str) -> None:
    """The floor check sees every way the cycle check sees one module reach another, and says where."""
    package = _fake_package(tmp_path)
    file, text, imported, line = PLANTS[how]
    path = package / file
    path.write_text(path.read_text() + text)
    upward, _ = _floor_faults(package, tmp_path / "architecture.md", {})
    importer = "cvt_deploy." + file.removesuffix(".py").replace("/", ".")
    floors = {"cvt_deploy.low": "bottom", "cvt_deploy.sub.a": "bottom", "cvt_deploy.high": "top"}
    upper = {"cvt_deploy.high": "top", "cvt_deploy.top.t": "top", "cvt_deploy.cli": "tools"}
    assert f"{importer} ({floors[importer]}) -> {imported} ({upper[imported]}) at line {line}" in upward, upward


def test_a_new_module_without_a_row_is_named(tmp_path: Path) -> None:
    package = _fake_package(tmp_path)
    (package / "sub" / "b.py").write_text("")  # covered by nothing: sub/ is named file by file
    (package / "top" / "u.py").write_text("")  # covered by top/
    assert _unplaced(package, tmp_path / "architecture.md") == ["cvt_deploy.sub.b"]


def test_an_allowance_the_code_no_longer_needs_fails(tmp_path: Path) -> None:
    """The allow-list cannot go stale: an allowed upward import that is gone is reported."""
    package = _fake_package(tmp_path)
    path = package / "low.py"
    path.write_text(path.read_text() + PLANTS["lazy"][1])
    allowed = {("cvt_deploy.low", "cvt_deploy.high"): "planted", ("cvt_deploy.sub.a", "cvt_deploy.top"): "gone"}
    assert _floor_faults(package, tmp_path / "architecture.md", allowed) == ([], ["cvt_deploy.sub.a -> cvt_deploy.top"])


def test_faults_of_the_table_itself_are_named(tmp_path: Path) -> None:
    package = _fake_package(tmp_path)
    doc = tmp_path / "architecture.md"
    doc.write_text(FAKE_TABLE.replace("| tools | `cli/*.py` |", "| tools | `cli/*.py`, `gone.py`, `low.py` |"))
    _, _, faults = _floors(doc, package)
    assert faults == ["`gone.py` (tools) names nothing in cvt_deploy/", "cvt_deploy.low sits on two floors: bottom, tools"]
