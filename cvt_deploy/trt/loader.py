"""The loader: a bundle's ONNX graph -> a TensorRT plan + sidecar (``build_engine``), added to the bundle.

Which graph an engine is built from is decided here (``source_graph``); how one graph becomes a
plan, for TensorRT on a GPU and TensorRT-RTX on any CPU alike, is :mod:`.builder`'s (precision
rules per TensorRT version there and in docs/tensorrt.md). The plan is written as a plain plan
(``model.<precision>.engine``, usable by trtexec and DeepStream; TensorRT-RTX's
``model.<precision>.rtx.engine``) with the build record beside it (``<engine>.json``).
TensorRT is imported inside the functions, so importing this module needs nothing.
"""
from __future__ import annotations

import sys
from typing import Sequence

from ..artifacts import REFERENCE, artifact_file, engine_source
from ..bundle import Artifact, Bundle, artifact_name
from ..bundle_write import changing
from ..errors import CvtDeployError
from ..util import check_precision
from .builder import MIN_TENSORRT, BuildOptions, PlanSource, build_engine_file  # noqa: F401  (MIN_TENSORRT: public)
from .sidecar import sidecar_path
from .util import TENSORRT, Toolkit, require_tensorrt, version_tuple


def engine_file(precision: str, toolkit: Toolkit = TENSORRT) -> str:
    """The plan's file name inside a bundle: ``model.<precision>.engine`` (TensorRT-RTX: ``.rtx.engine``)."""
    return artifact_file(toolkit.kind, precision)


def build_engine(bundle: Bundle, precision: str = "fp16", options: BuildOptions | None = None, *,
                 toolkit: Toolkit = TENSORRT, progress: bool = True, device: str | None = None) -> Artifact:
    """Build the ``precision`` engine of ``bundle`` and add it to the bundle: with TensorRT on
    this machine's GPU (``device``), or with TensorRT-RTX (``toolkit``) ahead of time on any
    machine. Returns the ``<toolkit.kind>-<precision>`` artifact."""
    from ..preprocess import graph_dims
    from .dla import check_dla_request, dla_strongly_typed

    options = options or BuildOptions()
    check_precision(precision)
    check_dla_request(options.dla_core, precision, bundle.batch)
    options.check_toolkit(toolkit)
    trt = require_tensorrt(f"building a {toolkit.name} engine", toolkit)
    version = str(trt.__version__)
    major = version_tuple(version)[0]
    strongly_typed = toolkit.aot or (major >= 10 if options.dla_core is None else dla_strongly_typed(major))
    source = source_graph(bundle, precision, strongly_typed, version, toolkit)
    io: dict[str, object] = {k: source.info[k] for k in ("input_format", "output_kind") if k in source.info}
    with changing(bundle):  # the plan and its sidecar land with their manifest entry, or not at all
        engine = bundle.new_file(engine_file(precision, toolkit))
        bundle.new_file(sidecar_path(engine).name)
        graph = PlanSource(bundle.verified_path(source), precision, bundle.batch, source.info.get("input"),
                           graph_dims(bundle.config.preprocess, str(io.get("input_format", "float"))),
                           fp32_nodes=source.info.get("fp32_nodes") or (), onnx_sha256=source.sha256 or None)
        built = build_engine_file(
            graph, engine, options, toolkit=toolkit, strongly_typed=strongly_typed, progress=progress, device=device,
            rebuild_hint=f"cvt-export --format {toolkit.format} --bundle {bundle.root} "
                         f"--precision {precision}")
        meta = built.meta
        io.update((k, v) for k, v in meta.extra.items() if k == "dla_core")
        info = {"sidecar": sidecar_path(engine).name, "source": source.name, "toolkit": toolkit.name,
                "tensorrt_version": meta.tensorrt_version, "gpu": meta.gpu_name,
                **({"targets": meta.targets} if meta.targets else
                   {"compute_capability": "{}.{}".format(*meta.compute_capability)}),
                "strongly_typed": meta.strongly_typed, "builder_flags": meta.builder_flags,
                "workspace_mib": meta.workspace_mib, "version_compatible": meta.version_compatible,
                "hardware_compatibility_level": meta.hardware_compatibility_level, "layers": built.report.layers,
                "build_seconds": round(built.report.seconds, 2), **io}
        return bundle.add(Artifact(artifact_name(toolkit.kind, precision), engine.name, toolkit.kind, precision, info=info))


def build_engines(bundle: Bundle, precisions: Sequence[str], options: BuildOptions | None = None, *,
                  toolkit: Toolkit = TENSORRT, progress: bool = True) -> list[Artifact]:
    """The engine stage of an export: an engine per precision, added to the bundle together (a
    failed build leaves it as it was). Their parity is the export's to check
    (``export.pipeline.add_engines`` builds and checks)."""
    options = options or BuildOptions()
    require_tensorrt(f"--format {toolkit.format}", toolkit)
    with changing(bundle):
        built = []
        for precision in precisions:
            art = build_engine(bundle, precision, options, toolkit=toolkit, progress=progress)
            print(f"built {bundle.root / art.file}", file=sys.stderr)
            built.append(art)
    return built


#: Why a strongly typed int8 engine should come from the int8+fp16 graph (audit item: the
#: fallback used to be silent).
INT8_FALLBACK = ("everything outside the Q/DQ pairs (LayerNorm, Softmax, GELU, attention) runs in fp32, so the engine "
                 "is likely slower than the fp16 one (NVIDIA/TensorRT-Model-Optimizer#167)")


def source_graph(bundle: Bundle, precision: str, strongly_typed: bool, version: str,
                 toolkit: Toolkit = TENSORRT) -> Artifact:
    """The ONNX artifact an engine of ``precision`` is built from on this TensorRT."""
    art, want, fell_back = engine_source(bundle, precision, strongly_typed)
    if fell_back and art is not None:
        print(f"warning: bundle {bundle.root} has no int8+fp16 graph, so {toolkit.name} {version} builds the int8 "
              f"engine strongly typed from {art.file}: {INT8_FALLBACK}.\n  fix: re-export the bundle with "
              f"cvt-export --precision int8 --out {bundle.root} (it writes model.int8-fp16.onnx), then rebuild",
              file=sys.stderr)
    # Bundles from before --tensorrt existed hold LayerNormalization nodes: written for 8.6 and newer.
    written_for = (art.info.get("tensorrt") or ["8.6", "10"]) if art is not None else []
    if art is not None and not toolkit.aot and version_tuple(version)[:2] == (8, 5) and "8.5" not in written_for:
        raise CvtDeployError(f"bundle {bundle.root}'s graphs are written for TensorRT {', '.join(written_for)} "
                             f"(single LayerNormalization nodes), which TensorRT {version} cannot import",
                             f"re-export the bundle for JetPack 5.1: cvt-export --tensorrt 8.5 --precision {want} "
                             f"--out {bundle.root} (on the machine with PyTorch), then copy it here")
    if art is not None:
        return art
    have = ", ".join(sorted(bundle.artifacts)) or "nothing"
    why = (f"{toolkit.name} {version} builds {precision} engines strongly typed, from the {precision} ONNX graph"
           if strongly_typed and precision != REFERENCE else f"a {precision} engine is built from the {want} ONNX graph")
    raise CvtDeployError(f"bundle {bundle.root} has no {want} ONNX graph ({why}); it has: {have}",
                         f"export the bundle with it: cvt-export --precision {precision} --out {bundle.root} "
                         "(on the machine with PyTorch), then copy the bundle here")
