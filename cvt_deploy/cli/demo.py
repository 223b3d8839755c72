"""cvt-demo: the whole job on the bundled demo model, in about a minute on a laptop CPU.

Export the demo CvT to a checked ONNX bundle (fp32, fp16, int8), classify real held-out
images with every backend available here, and time the backends briefly.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from .common import add_precision_arg, add_quiet_arg, aliases_note, cli_entry, deprecated_alias

DEFAULT_PRECISIONS = ["fp32", "fp16", "int8"]  # every graph: the demo shows them all


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cvt-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/demo"), help="bundle folder (default build/demo)")
    ap.add_argument("--images", nargs="*", help="images to classify (default: the demo's ten held-out sample digits)")
    add_precision_arg(ap, many=True, default=",".join(DEFAULT_PRECISIONS), value=DEFAULT_PRECISIONS,
                      extra=" (the graphs to export)")
    ap.add_argument("--no-bench", action="store_true", help="skip the short latency table")
    add_quiet_arg(ap)
    deprecated_alias(ap, "--precisions", "--precision")
    ap.epilog = aliases_note(ap)
    return ap


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    from ..checkpoints import load_checkpoint
    from ..demo import DEMO_SAMPLES, DEMO_WEIGHTS
    from ..export.pipeline import export_bundle
    from ..errors import NotRightHere
    from ..artifacts import precisions_present
    from ..backends import available_backends, load

    args = build_parser().parse_args(argv)

    print("== 1. export the demo model (CvT-tiny trained on handwritten digits) and check it ==")
    model = load_checkpoint(DEMO_WEIGHTS)
    result = export_bundle(model, args.out, source=str(DEMO_WEIGHTS), precisions=args.precision,
                           progress=not args.quiet)
    print(f"bundle: {args.out} ({', '.join(sorted(result.bundle.artifacts))})\n")

    images = args.images or sorted(str(p) for p in DEMO_SAMPLES.glob("*.png"))
    print(f"== 2. classify {len(images)} real held-out images on every backend here ==")
    names = [Path(p).name for p in images]
    columns: dict[str, list[str]] = {}
    for backend, reason in available_backends(result.bundle).items():
        if reason is not None:
            print(f"  {backend}: skipped ({reason})")
            continue
        precisions = precisions_present(result.bundle, backend, "cpu")
        for precision in precisions:
            try:
                rt = load(result.bundle, backend=backend, precision=precision)
            except NotRightHere as e:  # e.g. OpenVINO's 8-bit int8 on a CPU without VNNI: said, never run
                print(f"  {backend} {precision}: skipped ({e.message})")
                continue
            pred = rt.predict(images, topk=1)
            columns[f"{backend} {precision}"] = [f"{lab[0]} ({100 * float(s[0]):.0f}%)" for lab, s in zip(pred.labels, pred.scores)]
    from ..table import format_table

    print(format_table(["image", *columns], [[n, *(c[i] for c in columns.values())] for i, n in enumerate(names)]))
    if not args.no_bench:
        print("\n== 3. latency, briefly (cvt-bench --quick; see cvt-bench --help for a careful run) ==")
        from .bench import main as bench_main

        return bench_main(["--bundle", str(args.out), "--quick", "--batch", "1,8", "--no-hf",
                           *(["--quiet"] if args.quiet else [])])
    return 0
