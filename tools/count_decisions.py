#!/usr/bin/env python
"""Count where cvt_deploy decides precision, backend and target, and its largest functions.

The before/after yardstick of issue #32 ("One owner per decision"). Standard library only;
it parses the package with ``ast`` and imports none of it.

    .venv/bin/python tools/count_decisions.py [--json] [--list] [--package cvt_deploy] [--top N]

``--root DIR`` counts another tree, e.g. the last commit for a before/after pair:
``git archive HEAD cvt_deploy | tar -x -C /tmp/before`` then ``--root /tmp/before``.

A *switch site* is one (file, line, concept, kind) where package code branches on, or looks
up by, a concept's literal value (``VALUES`` below); one node naming two concepts counts for
both, and two nodes of one kind and concept on one line count once. The kinds:

- ``compare``: an ``==``/``!=`` whose other side is such a string (or a tuple/list of them).
- ``member``: an ``in``/``not in`` test of such a string, or against a tuple/list/set literal
  holding one.
- ``case``: a ``match`` ``case`` whose pattern holds such a string.
- ``table``: a dict literal with two or more keys of one concept (one site per dict and concept).
- ``subscript``: ``x["fp16"]``, a lookup keyed by such a string.

Not counted: docstrings, f-strings, anything inside a ``raise`` (error wording, not behaviour),
default argument values, and tuples of values that are only defined (a registry), not tested.
The TensorRT release strings "8.5", "8.6", "10" count (as target) only where the other side is
named like version/tensorrt/trt/target/release, or beside another release string in one literal.

A *selection site* decides which artifact a backend runs: a ``find``/``require``/
``artifacts_for`` attribute call whose receiver is named like ``*bundle*`` or whose
first argument is an artifact-kind string (``call``), or a loop/comprehension over
``*.artifacts`` that compares an artifact's ``.kind``/``.precision``/``.target`` (``loop``).

Each concept has owners, the modules whose job the decision is (``OWNERS``: the artifact
registry for all three; the backend registry for backends; the static TensorRT readiness check
for the release rules it encodes). A site outside its owners is *justified* when its line, or
the comment block right above it, carries a ``# decision:`` comment saying why it is decided
there; the report gives, per concept, the sites outside the owners and how many are justified.

Functions are ranked by ``end_lineno - lineno + 1`` (decorators excluded); their parameter
count leaves out a method's ``self``/``cls``.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator, NamedTuple

ROOT = Path(__file__).resolve().parent.parent

PRECISION, BACKEND, TARGET = "precision", "backend", "target"
CONCEPTS = (PRECISION, BACKEND, TARGET)
VALUES: dict[str, str] = {
    **dict.fromkeys(("fp32", "fp16", "int8"), PRECISION),
    **dict.fromkeys(("tensorrt", "tensorrt-rtx", "onnxruntime", "openvino", "torch", "torch-compile",
                     "hf-transformers", "openvino-plain"), BACKEND),
    **dict.fromkeys(("portable", "onnxruntime-cpu", "tensorrt-10", "tensorrt-8.5", "tensorrt-8.6"), TARGET),
}
RELEASES = frozenset({"8.5", "8.6", "10"})  # bare "10" is too common to count without context
RELEASE_CONTEXT = re.compile(r"version|tensorrt|trt|target|release", re.IGNORECASE)
ARTIFACT_KINDS = frozenset({"onnx", "tensorrt", "tensorrt-rtx", "torch", "deepstream", "openvino"})  # bundle.py
# A lookup by kind and precision that a caller makes itself; ``select``/``candidates``/``engine_source``
# (the registry's selection, also as ``Bundle.select``) ask the owner and are not sites.
SELECTORS = frozenset({"find", "require", "artifacts_for"})
SELECTION = "selection"
#: The modules a decision belongs to (paths inside the package).
OWNERS: dict[str, tuple[str, ...]] = {
    PRECISION: ("artifacts.py",),
    BACKEND: ("artifacts.py", "backends.py"),
    TARGET: ("artifacts.py", "trt/readiness.py", "trt/qdq_rules.py", "trt/parser_facts.py"),
    SELECTION: ("artifacts.py",),
}
JUSTIFIED = re.compile(r"#\s*decision:")
ARTIFACT_FIELDS = frozenset({"kind", "precision", "target"})


class Site(NamedTuple):
    file: str
    line: int
    concept: str
    kind: str
    justified: bool = False


class Func(NamedTuple):
    file: str
    qualname: str
    lines: int
    params: int


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk minus the subtrees that are wording or defaults, never a decision."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.JoinedStr, ast.Raise, ast.arguments)):
            continue
        yield from _walk(child)


def _name(node: ast.AST) -> str:
    """The name a value goes by: ``x``, ``a.b`` -> ``b``, ``x[0]`` -> ``x``, ``f()`` -> ``f``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, (ast.Subscript, ast.Call, ast.Starred)):
        return _name(node.value if not isinstance(node, ast.Call) else node.func)
    return ""


def _strings(node: ast.AST | None) -> list[str]:
    """The string constants of a literal: one string, or the elements of a tuple/list/set."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _concepts(values: list[str], context: str) -> set[str]:
    """The concepts these literals name; a release string needs a release-like context or a sibling."""
    found = {VALUES[v] for v in values if v in VALUES}
    if any(v in RELEASES for v in values) and (RELEASE_CONTEXT.search(context)
                                               or len(RELEASES.intersection(values)) >= 2):
        found.add(TARGET)
    return found


def switch_sites(tree: ast.AST, file: str) -> set[Site]:
    sites: set[Site] = set()
    for node in _walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, a, b in zip(node.ops, operands, operands[1:]):
                if isinstance(op, (ast.Eq, ast.NotEq)):
                    hits = _concepts(_strings(b), _name(a)) | _concepts(_strings(a), _name(b))
                    sites.update(Site(file, line, c, "compare") for c in hits)
                elif isinstance(op, (ast.In, ast.NotIn)):
                    # "int8" in precisions, or precision in ("fp16", "int8")
                    values = _strings(a) if isinstance(a, ast.Constant) else _strings(b)
                    context = _name(b) if isinstance(a, ast.Constant) else _name(a)
                    sites.update(Site(file, line, c, "member") for c in _concepts(values, context))
        elif isinstance(node, ast.Match):
            for case in node.cases:
                values = [p.value.value for p in ast.walk(case.pattern) if isinstance(p, ast.MatchValue)
                          and isinstance(p.value, ast.Constant) and isinstance(p.value.value, str)]
                sites.update(Site(file, case.pattern.lineno, c, "case")
                             for c in _concepts(values, _name(node.subject)))
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            per = Counter(VALUES[k] for k in keys if k in VALUES)
            per[TARGET] += len(RELEASES.intersection(keys))
            # one key of a concept is a record field ({"tensorrt": [...]}), two or more a name table
            sites.update(Site(file, line, c, "table") for c, n in per.items() if n >= 2)
        elif isinstance(node, ast.Subscript):
            values = _strings(node.slice) if isinstance(node.slice, ast.Constant) else []
            sites.update(Site(file, line, c, "subscript") for c in _concepts(values, _name(node.value)))
    return sites


def _compares_artifact_field(nodes: list[ast.AST]) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in ARTIFACT_FIELDS
               for top in nodes for c in ast.walk(top) if isinstance(c, ast.Compare) for n in ast.walk(c))


def _over_artifacts(it: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "artifacts" for n in ast.walk(it))


def selection_sites(tree: ast.AST, file: str) -> set[Site]:
    sites: set[Site] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SELECTORS:
            first = node.args[0] if node.args else None
            if "bundle" in _name(node.func.value).lower() or set(_strings(first)) & ARTIFACT_KINDS:
                sites.add(Site(file, node.lineno, "artifact", "call"))
        elif isinstance(node, (ast.For, ast.AsyncFor)) and _over_artifacts(node.iter) \
                and _compares_artifact_field(list(node.body)):
            sites.add(Site(file, node.lineno, "artifact", "loop"))
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for gen in node.generators:
                if _over_artifacts(gen.iter) and _compares_artifact_field(list(gen.ifs)):
                    sites.add(Site(file, node.lineno, "artifact", "loop"))
    return sites


def functions(tree: ast.AST, file: str, prefix: str = "") -> list[Func]:
    out: list[Func] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            out += functions(node, file, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if p]
            if prefix and names[:1] in (["self"], ["cls"]):
                names = names[1:]
            out.append(Func(file, prefix + node.name, (node.end_lineno or node.lineno) - node.lineno + 1, len(names)))
            out += functions(node, file, f"{prefix}{node.name}.<locals>.")
    return out


def _justify(site: Site, lines: list[str]) -> Site:
    """Justified: ``# decision:`` on the site's line or in the comment block right above it."""
    found = bool(JUSTIFIED.search(lines[site.line - 1])) if site.line <= len(lines) else False
    i = site.line - 2
    while not found and i >= 0 and lines[i].strip().startswith("#"):
        found, i = bool(JUSTIFIED.search(lines[i])), i - 1
    return site._replace(justified=found)


def _owned(site: Site, package: str, concept: str) -> bool:
    return any(site.file == f"{package}/{owner}" for owner in OWNERS[concept])


def _block(sites: list[Site], package: str, concept: str) -> dict[str, Any]:
    outside = [s for s in sites if not _owned(s, package, concept)]
    return {"sites": len(sites), "files": len({s.file for s in sites}),
            "kinds": dict(sorted(Counter(s.kind for s in sites).items())),
            "outside_owners": len(outside), "justified": sum(s.justified for s in outside),
            "unjustified": [s._asdict() for s in outside if not s.justified],
            "per_file": _by_file(sites), "list": [s._asdict() for s in sites]}


def _by_file(sites: list[Site]) -> list[tuple[str, int]]:
    return sorted(Counter(s.file for s in sites).items(), key=lambda kv: (-kv[1], kv[0]))


def collect(package: Path, base: Path, top: int = 10) -> dict[str, Any]:
    """The whole report for every .py file under ``package``, paths relative to ``base``."""
    switches: set[Site] = set()
    selections: set[Site] = set()
    funcs: list[Func] = []
    files = sorted(package.rglob("*.py"))
    for path in files:
        rel = path.relative_to(base).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, filename=rel)
        switches |= {_justify(s, lines) for s in switch_sites(tree, rel)}
        selections |= {_justify(s, lines) for s in selection_sites(tree, rel)}
        funcs += functions(tree, rel)
    per: dict[str, list[Site]] = defaultdict(list)
    for s in sorted(switches):
        per[s.concept].append(s)
    sel = sorted(selections)
    name = package.relative_to(base).as_posix()
    return {
        "package": name,
        "files_scanned": len(files),
        "switch": {c: _block(per[c], name, c) for c in CONCEPTS},
        "selection": _block(sel, name, SELECTION),
        "largest": [f._asdict() for f in sorted(funcs, key=lambda f: (-f.lines, f.file, f.qualname))[:top]],
    }


def render(report: dict[str, Any], listing: bool = False) -> str:
    out = [f"{report['package']}: {report['files_scanned']} files"]

    def section(title: str, block: dict[str, Any]) -> None:
        kinds = ", ".join(f"{k} {n}" for k, n in block["kinds"].items())
        out.append(f"{title}: {block['sites']} sites in {block['files']} files ({kinds}); outside its owners "
                   f"{block['outside_owners']}, {block['justified']} of them justified (# decision:)")
        out.extend(f"    {n:4d}  {f}" for f, n in block["per_file"])
        if listing:
            out.extend(f"          {s['file']}:{s['line']} {s['kind']}" for s in block["list"])
        out.extend(f"      unjustified: {s['file']}:{s['line']} {s['kind']}" for s in block["unjustified"])

    out.append("\nswitch sites")
    for concept in CONCEPTS:
        section(f"  {concept}", report["switch"][concept])
    out.append("")
    section("selection sites (which artifact a backend runs)", report["selection"])
    out.append("\nlargest functions (path:qualname lines params)")
    out.extend(f"  {f['file']}:{f['qualname']} {f['lines']} {f['params']}" for f in report["largest"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--package", default="cvt_deploy", help="package folder, relative to --root")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    ap.add_argument("--top", type=int, default=10, help="how many of the largest functions to show")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--list", action="store_true", help="also list every site (file:line kind)")
    args = ap.parse_args(argv)
    report = collect(args.root / args.package, args.root, args.top)
    print(json.dumps(report, indent=1) if args.json else render(report, args.list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
