#!/usr/bin/env python
"""Regenerate the operator tables in ``cvt_deploy/trt/parser_ops.json`` from onnx-tensorrt.

For each ``--ref VERSION=GITREF`` this reads ``docs/operators.md`` at that ref of a local
onnx/onnx-tensorrt git directory (bare or not; only ``git show`` / ``git rev-parse`` are
used), parses its "Operator Support Matrix" markdown table and keeps every row whose
"Supported" column is ``Y``: ``{"types": [...], "restrictions": "..."}``, both verbatim
from the doc. The hand-written ``"notes"`` (importer-source facts) are copied unchanged
from ``--notes-from``. The result is written atomically (temporary file + ``os.replace``)
with sorted keys and ``indent=1``. Standard library only.

    python tools/trt_parser_table.py GIT_DIR --ref 8.5=release/8.5-GA \\
        --ref 8.6=release/8.6-GA --ref 10=release/10.0-GA \\
        --notes-from cvt_deploy/trt/parser_ops.json --out cvt_deploy/trt/parser_ops.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DOC = "docs/operators.md"
HEADER = ("operator", "supported", "supported types", "restrictions")


def git(git_dir: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(git_dir), *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"trt_parser_table: git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def cells(line: str) -> list[str]:
    """Split one markdown table row into at most four stripped cells."""
    body = line.strip()[1:]  # drop the leading "|"
    if body.endswith("|"):
        body = body[:-1]
    parts = [p.strip() for p in body.split("|", 3)]
    return parts + [""] * (4 - len(parts))


def parse_table(text: str) -> dict[str, dict[str, Any]]:
    """The ``Y`` rows of the operator table: {op: {"types": [...], "restrictions": str}}."""
    ops: dict[str, dict[str, Any]] = {}
    in_table = False
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        row = cells(line)
        if tuple(c.lower() for c in row) == HEADER:
            in_table = True
            continue
        if not in_table or set(row[0]) <= set("-: "):
            continue
        name, supported, types, restrictions = row
        if supported.upper() != "Y":
            continue
        if name in ops:
            sys.exit(f"trt_parser_table: {name} listed twice")
        # Commas and/or spaces separate types (10.0's Split row reads "INT64 BOOL").
        ops[name] = {"types": [t for t in re.split(r"[,\s]+", types) if t],
                     "restrictions": restrictions}
    if not ops:
        sys.exit("trt_parser_table: no operator table found")
    return ops


def build(git_dir: Path, refs: list[tuple[str, str]]) -> dict[str, Any]:
    sources: dict[str, Any] = {}
    ops: dict[str, Any] = {}
    for version, ref in refs:
        commit = git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
        sources[version] = {"ref": ref, "commit": commit, "file": DOC}
        ops[version] = parse_table(git(git_dir, "show", f"{commit}:{DOC}"))
    return {"sources": sources, "ops": ops}


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the JSON ships as package data
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("git_dir", type=Path, help="local onnx/onnx-tensorrt git directory")
    ap.add_argument("--ref", action="append", required=True, metavar="VERSION=GITREF")
    ap.add_argument("--notes-from", type=Path, help="JSON file whose 'notes' are kept")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    refs = []
    for spec in args.ref:
        version, sep, ref = spec.partition("=")
        if not sep or not version or not ref:
            ap.error(f"--ref wants VERSION=GITREF, got {spec!r}")
        refs.append((version, ref))
    data = build(args.git_dir, refs)
    notes: list[Any] = []
    if args.notes_from and args.notes_from.is_file():
        notes = json.loads(args.notes_from.read_text(encoding="utf-8")).get("notes", [])
    data["notes"] = notes
    write_atomic(args.out, data)
    print(f"wrote {args.out}: " + ", ".join(f"{v}: {len(data['ops'][v])} ops" for v, _ in refs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
