#!/usr/bin/env python
"""Copy the installed ``tensorrt-stubs`` into a folder mypy can use, repairing them.

The generated stubs (see ../shared/reference/tensorrt.md) ship without a ``py.typed``
marker (mypy then treats all of TensorRT as Any, so a misspelt API would pass) and have
signatures that are not valid Python: a parameter named ``in`` and required parameters
after defaulted ones. This rewrites exactly those lines, re-parsing until the files are
valid, and fails loudly if the stubs are missing or cannot be repaired.

    python tools/repair_trt_stubs.py build/typestubs
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")


def find_stub_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / "__init__.pyi").is_file():
            return Path(loc)
    sys.exit(f"repair_trt_stubs: no stubs for {package!r} found; install them with "
             f"`pip install --no-deps tensorrt-stubs`")


def repair_line(line: str) -> str:
    end = "\n" if line.endswith("\n") else ""
    line = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", line)
    # A required parameter after a defaulted one: give every later required one "= ...".
    m = re.match(r"(\s*def \w+\()(.*)(\)\s*->.*)$", line)
    if m:
        params, seen_default = [], False
        for p in _split_params(m.group(2)):
            if "=" in p:
                seen_default = True
            elif seen_default and not p.strip().startswith("*"):
                p = p + " = ..."
            params.append(p)
        line = m.group(1) + ",".join(params) + m.group(3)
    return line.rstrip("\n") + end


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur or parts else parts


def repair_file(path: Path) -> int:
    lines = path.read_text().splitlines(keepends=True)
    fixed = 0
    for _ in range(200):
        try:
            ast.parse("".join(lines), str(path))
            return fixed
        except SyntaxError as e:
            # The parser may point a line or two away from the bad signature.
            i = (e.lineno or 1) - 1
            near = [j for j in range(max(i - 2, 0), min(i + 3, len(lines))) if repair_line(lines[j]) != lines[j]]
            if not near:
                sys.exit(f"repair_trt_stubs: cannot repair {path}:{e.lineno}: {e.msg}\n  {lines[i].strip()}")
            lines[near[0]] = repair_line(lines[near[0]])
            path.write_text("".join(lines))
            fixed += 1
    sys.exit(f"repair_trt_stubs: gave up on {path} after 200 repairs")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/typestubs")
    total = 0
    for pkg in PACKAGES:
        src, dst = find_stub_dir(pkg), out / pkg
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        (dst / "py.typed").write_text("")
        for pyi in sorted(dst.rglob("*.pyi")):
            total += repair_file(pyi)
    print(f"repair_trt_stubs: {total} lines repaired; stubs for {', '.join(PACKAGES)} in {out}")


if __name__ == "__main__":
    main()
