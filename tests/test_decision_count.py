"""tools/count_decisions.py (issue #32's yardstick) counts exactly the sites its docstring defines."""
from __future__ import annotations

import ast
import importlib.util
import json
import textwrap
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "count_decisions.py"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    # tools/ is no package: load the script by path, as tests/test_fixtures.py loads a conftest.
    spec = importlib.util.spec_from_file_location("count_decisions", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(tmp_path: Path, source: str) -> tuple[ast.AST, list[str]]:
    text = textwrap.dedent(source)
    path = tmp_path / "pkg" / "mod.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return ast.parse(text), text.splitlines()


def _line(lines: list[str], marker: str) -> int:
    return next(i for i, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}"))


SWITCHES = '''
    """Docstring: int8 and fp16 are precisions, tensorrt a backend."""
    TABLE = {"fp32": "a.onnx", "fp16": "b.onnx"}  # table
    RECORD = {"tensorrt": ["10"], "shape": 1}  # one key of a concept is a record field, not a table
    RELEASES = {"8.5": 17, "10": 20}  # releases
    PRECISIONS = ("fp32", "fp16", "int8")  # a registry, only defined


    def f(precision, backend, version, wanted=("onnxruntime",)):
        if precision == "int8":  # compare
            pass
        if precision in ("fp16", "int8") and backend != "tensorrt":  # member+compare
            pass
        name = TABLE["fp16"]  # subscript
        msg = f"{precision} is int8: {precision == 'int8'}"  # f-string
        if version != "10" and len(name) == 10:  # release
            pass
        if name == "10" or name == "portable-ish":  # neither a release context nor a value
            pass
        if "int8" in wanted:  # literal in
            raise ValueError("bad" if backend == "openvino" else "worse")
        match backend:
            case "torch" | "openvino":  # case
                pass
        return msg
'''


def test_switch_sites_count_tests_and_tables_only(tool: ModuleType, tmp_path: Path) -> None:
    tree, lines = _parse(tmp_path, SWITCHES)
    at = partial(_line, lines)
    assert tool.switch_sites(tree, "m.py") == {
        tool.Site("m.py", at("table"), "precision", "table"),
        tool.Site("m.py", at("releases"), "target", "table"),
        tool.Site("m.py", at("compare"), "precision", "compare"),
        tool.Site("m.py", at("member+compare"), "precision", "member"),
        tool.Site("m.py", at("member+compare"), "backend", "compare"),
        tool.Site("m.py", at("subscript"), "precision", "subscript"),
        tool.Site("m.py", at("release"), "target", "compare"),
        tool.Site("m.py", at("literal in"), "precision", "member"),
        tool.Site("m.py", at("case"), "backend", "case"),
    }  # not: the docstring, the record, the registry, the default, the f-string, "10" vs name, the raise


def test_selection_sites_and_function_sizes(tool: ModuleType, tmp_path: Path) -> None:
    tree, lines = _parse(tmp_path, '''
        def pick(bundle, source, data, p):
            a = bundle.find("onnx", "fp32")  # find
            b = source.require("tensorrt", p)  # kind literal
            c = data.find("x")  # str.find, not a bundle
            d = [x for x in bundle.artifacts.values() if x.kind == "onnx"]  # comprehension
            e = {x.precision for x in bundle.artifacts.values()}  # no filter
            for art in sorted(bundle.artifacts.values(), key=str):  # loop
                if art.target == "portable":
                    return art


        class Runner:
            def run(self, x, *rest, y=1, **kw):
                return x
    ''')
    at = partial(_line, lines)
    assert tool.selection_sites(tree, "m.py") == {
        tool.Site("m.py", at(marker), "artifact", kind)
        for marker, kind in (("find", "call"), ("kind literal", "call"), ("comprehension", "loop"), ("loop", "loop"))
    }
    assert sorted(tool.functions(tree, "m.py")) == [tool.Func("m.py", "Runner.run", 2, 4),
                                                     tool.Func("m.py", "pick", 9, 4)]


def test_the_real_package_has_sites_of_every_concept(tool: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main(["--json", "--top", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    for concept in ("precision", "backend", "target"):
        block = report["switch"][concept]
        assert block["sites"] > 0 and block["files"] > 0
        assert sum(n for _, n in block["per_file"]) == block["sites"] == len(block["list"])
    assert report["selection"]["sites"] > 0
    sizes = [f["lines"] for f in report["largest"]]
    assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True)


def test_owners_and_justified_sites_are_told_apart(tool: ModuleType, tmp_path: Path) -> None:
    """A site in its concept's owner module is the owner deciding; elsewhere a ``# decision:``
    comment (on the line or the comment line above) justifies it; asking the registry is no site."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "artifacts.py").write_text('GATES = {"fp32": 1, "int8": 2}\n')
    (pkg / "user.py").write_text(textwrap.dedent('''
        def f(p, bundle):
            if p == "int8":  # decision: the int8 stage's own step
                pass
            # decision: the reference graph, by definition
            ref = bundle.find("onnx", "fp32")
            chosen = bundle.select("onnxruntime", p)
            return p == "fp16", ref, chosen
    '''))
    report = tool.collect(pkg, tmp_path)
    precision = report["switch"]["precision"]
    assert precision["sites"] == 3 and precision["outside_owners"] == 2 and precision["justified"] == 1
    assert [s["line"] for s in precision["unjustified"]] == [8]
    selection = report["selection"]
    assert selection["sites"] == 1 and selection["justified"] == 1 and selection["unjustified"] == []


def test_every_decision_outside_its_owner_says_why(tool: ModuleType) -> None:
    """The registry (cvt_deploy/artifacts.py) owns precision, target, backend and selection; a site
    elsewhere carries a ``# decision:`` comment, so a new one that copies the registry fails here."""
    report = tool.collect(tool.ROOT / "cvt_deploy", tool.ROOT)
    loose = {c: report["switch"][c]["unjustified"] for c in report["switch"]} | {
        "selection": report["selection"]["unjustified"]}
    assert not any(loose.values()), {c: [f"{s['file']}:{s['line']}" for s in v] for c, v in loose.items() if v}
