"""Time every ONNX graph of a bundle on ONNX Runtime CPU, interleaved, with the GEMM ceilings.

cvt-bench times what ``load`` picks (on the CPU: the ORT-CPU graph of each precision); this
times each graph by name, portable and ORT-CPU side by side, to show which is faster here:

    python scripts/compare_graphs.py build/cvt13 --batch 1,8 --threads 2
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from cvt_deploy.bench.limits import ceilings
from cvt_deploy.bench.timing import Case, measure_interleaved, summarize
from cvt_deploy.bundle import Bundle
from cvt_deploy.cli.common import ListOption, cli_entry, deprecated_alias
from cvt_deploy.runtimes.ort import OrtRuntime
from cvt_deploy.table import format_table


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    # Spelled as cvt-bench spells it: batch sizes, a comma list or repeated.
    ap.add_argument("--batch", action=ListOption, what="batch size", default=[1, 8], metavar="N[,N]",
                    help="batch sizes to time (default 1,8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per graph and batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--matmul-size", type=int, default=1024)
    deprecated_alias(ap, "--batches", "--batch")
    args = ap.parse_args(argv)
    bundle = Bundle.open(args.bundle)
    cfg = bundle.config
    graphs = [a for a in bundle.artifacts.values() if a.kind == "onnx"]
    batches: list[int] = args.batch
    cases: dict[tuple[str, int], Case] = {}
    for art in graphs:
        runtime = OrtRuntime.from_bundle(bundle, artifact=art.name, threads=args.threads)
        for b in batches:
            x = np.random.default_rng(b).standard_normal((b, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
            cases[art.name, b] = Case.for_runtime(f"{art.name} b{b}", runtime, x)
    gemms = ceilings(args.matmul_size, "cpu", args.threads)
    measure_interleaved([*cases.values(), *(g.case for g in gemms)], min_time=args.min_time, rounds=args.rounds)
    rows = []
    for (name, b), case in cases.items():
        p50 = summarize(case.times).p50
        base = summarize(cases["onnx-fp32", b].times).p50
        rows.append([name, str(b), f"{p50:.2f}", f"{(case.first or 0) * 1e3:.1f}", f"{base / p50:.2f}x"])
    print(format_table(["graph", "batch", "p50 ms", "first ms", "vs portable fp32"], rows))
    print("; ".join(f"{g.name} ({g.impl}): {g.gops:.1f} GOP/s" for g in gemms if g.gops))
    return 0


if __name__ == "__main__":
    sys.exit(main(None))
