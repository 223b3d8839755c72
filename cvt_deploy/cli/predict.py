"""cvt-predict: classify images with a bundle on any backend; prints a top-k table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..data import CHUNK
from ..errors import CvtDeployError
from ..preprocess import preprocess
from ..backends import BACKENDS
from ..table import printable
from .common import (add_backend_arg, add_json_arg, add_precision_arg, add_quiet_arg, cli_entry, whole_number)

if TYPE_CHECKING:
    from ..config import PreprocessConfig

EPILOG = """\
IMAGE may be a file or a folder (searched recursively). Without --backend: TensorRT where it
runs; else, on the CPU, the backend and graph that cvt-export (or cvt-bench --record) measured
fastest on this CPU at this many images (a note says which); else the first of onnxruntime,
openvino, torch that is installed. With --backend onnxruntime the same measurement picks
between its graphs.

examples:
  cvt-predict --bundle build/demo examples/digits/*.png
  cvt-predict --bundle build/cvt13 --backend onnxruntime --precision int8 --json cat.jpg
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-predict", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder written by cvt-export (or a .onnx file)")
    add_backend_arg(ap, list(BACKENDS), many=False, default="the best available (see below)")
    add_precision_arg(ap, many=False, default="the most precise in the bundle")
    ap.add_argument("--device", help="cpu or cuda (onnxruntime also: tensorrt provider)")
    ap.add_argument("--topk", type=whole_number, default=5, metavar="K", help="classes per image, >= 1 (default 5; at most the class count)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip files that are not readable images (each named on stderr) instead of stopping")
    add_json_arg(ap, "the top-k classes and scores per image")
    add_quiet_arg(ap)
    return ap


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..preprocess import find_images
    from ..progress import track
    from ..backends import load
    from ..runtimes.base import Prediction, check_topk

    args = build_parser().parse_args(argv)
    check_topk(args.topk)
    files: list[str] = []
    for item in args.images:
        files += [str(f) for f in find_images(item)] if Path(item).is_dir() else [item]
    runtime = load(args.bundle, backend=args.backend, device=args.device, precision=args.precision,
                   batch=max(1, min(len(files), CHUNK)))
    if runtime.choice and not args.quiet:
        print(f"note: {printable(runtime.choice)}", file=sys.stderr)
    # Chunk by chunk: a folder of any size runs in bounded memory (only the top-k are kept).
    parts, kept = [], []
    chunks = range(0, len(files), CHUNK)
    for i in track(chunks, len(chunks), "predicting", len(chunks) > 1 and not args.quiet):
        batch, names = _read(files[i:i + CHUNK], runtime.config.preprocess, args.skip_bad)
        if names:
            parts.append(runtime.predict(batch, topk=args.topk))
            kept += names
    if not kept:
        raise CvtDeployError("none of the files is a readable image", "pass image files (JPEG, PNG, ...)")
    pred, files = Prediction.concat(parts), kept
    if args.json:
        print(pred.to_json(files))
    else:
        print(printable(f"{runtime.config.variant} on {runtime.describe()}"))
        print(pred.table([Path(f).name for f in files]))
    return 0


def _read(files: list[str], cfg: PreprocessConfig, skip_bad: bool) -> tuple[np.ndarray, list[str]]:
    """Preprocessed images and their names; with ``skip_bad`` unreadable ones are named and left out."""
    if not skip_bad:
        return preprocess(files, cfg), files
    batch, names = [], []
    for f in files:
        try:
            batch.append(preprocess(f, cfg))
            names.append(f)
        except CvtDeployError as e:
            print(f"skipped {printable(f)}: {printable(e.message)}", file=sys.stderr)
    return (np.concatenate(batch) if batch else np.zeros((0,))), names
