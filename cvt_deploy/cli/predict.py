"""cvt-predict: classify images with a bundle on any backend; prints a top-k table."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..runtimes import BACKENDS
from .common import cli_entry

EPILOG = """\
IMAGE may be a file or a folder (searched recursively). Without --backend the first of
tensorrt, onnxruntime, torch that is installed and present in the bundle is used.

examples:
  cvt-predict --bundle build/demo examples/digits/*.png
  cvt-predict --bundle build/cvt13 --backend onnxruntime --precision int8 --json cat.jpg
"""


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..preprocess import find_images
    from ..runtimes import load

    ap = argparse.ArgumentParser(prog="cvt-predict", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder written by cvt-export (or a .onnx file)")
    ap.add_argument("--backend", choices=list(BACKENDS), help="default: best available")
    ap.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="default: most precise in the bundle")
    ap.add_argument("--device", help="cpu or cuda (onnxruntime also: tensorrt provider)")
    ap.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    files: list[str] = []
    for item in args.images:
        files += [str(f) for f in find_images(item)] if Path(item).is_dir() else [item]
    runtime = load(args.bundle, backend=args.backend, device=args.device, precision=args.precision)
    pred = runtime.predict(files, topk=args.topk)
    if args.json:
        print(pred.to_json(files))
    else:
        print(f"{runtime.config.variant} on {runtime.describe()}")
        print(pred.table([Path(f).name for f in files]))
    return 0
