"""The loader: a bundle's ONNX graph -> a TensorRT plan + sidecar (``build_engine``), added to the bundle.

Where the precision comes from depends on the TensorRT version (see
docs/tensorrt.md):

* TensorRT >= 10: a STRONGLY_TYPED network built from the ONNX graph *of that precision*
  (``onnx-fp16``: fp16 with LayerNorm/Softmax kept fp32; ``onnx-int8``: Q/DQ). TensorRT 11
  knows nothing else: its FP16/INT8 builder flags are gone.
* TensorRT 8.5 (JetPack 5.1) and 8.6 (JetPack 6.0): the fp32 graph plus BuilderFlag.FP16, with
  LayerNorm and Softmax pinned to fp32 (OBEY_PRECISION_CONSTRAINTS): the Normalization and
  SoftMax layers by layer type, and on 8.5, whose graph writes LayerNorm out as elementwise
  ops (``cvt-export --tensorrt 8.5``), exactly the nodes the manifest names (``fp32_nodes``).
  int8 from the Q/DQ graph with the INT8 (+FP16) flags. No implicit calibration: it is
  deprecated since TensorRT 10.1.

The plan is written as a plain plan (``model.<precision>.engine``, usable by trtexec and
DeepStream) with the build record beside it (``model.<precision>.engine.json``).
TensorRT is imported inside the functions, so importing this module needs nothing.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..bundle import Artifact, Bundle, artifact_name
from ..errors import CvtDeployError
from ..util import BatchRange, atomic_output, check_precision, file_sha256
from .progress import attach_progress, heartbeat
from .sidecar import EngineMeta, profile_shapes, sidecar_path
from .util import (MESSAGES, check_hardware_compatible, cuda_call, cuda_device_index, cuda_device_info, cuda_free_memory, default_workspace_mib, dims,
                   format_errors, import_cudart, require_tensorrt, trt_logger, version_tuple)

if TYPE_CHECKING:
    import tensorrt

#: Oldest TensorRT that builds here: 8.5 (JetPack 5.1, every Xavier), from graphs exported with
#: ``--tensorrt 8.5`` (it has no LayerNormalization importer); version and hardware
#: compatibility need 8.6.
MIN_TENSORRT = (8, 5)
COMPATIBILITY_TENSORRT = (8, 6)


def engine_file(precision: str) -> str:
    """The plan's file name inside a bundle: ``model.<precision>.engine``."""
    return f"model.{precision}.engine"


def build_engine(bundle: Bundle, precision: str = "fp16", *, workspace_mib: int | None = None,
                 timing_cache: str | os.PathLike[str] | None = None, version_compatible: bool = False,
                 hardware_compatible: bool = False, progress: bool = True, device: str | None = None,
                 dla_core: int | None = None) -> Artifact:
    """Build the ``precision`` engine of ``bundle`` on this machine's GPU and add it to the bundle.

    ``workspace_mib``: builder workspace pool limit (None: 1 GiB, clamped to half the free
    GPU memory). ``timing_cache``: file reused and updated across builds (kernel timings;
    makes rebuilds much faster). ``version_compatible``: the engine also runs on newer
    TensorRT of the same major version. ``hardware_compatible``: the engine runs on every
    GPU of compute capability >= 8.0 (Ampere and newer), possibly a little slower. ``dla_core``:
    that Jetson DLA core, GPU fallback (fp16 only; trt/dla.py). Returns the ``tensorrt-<precision>`` artifact.
    """
    from ..preprocess import graph_dims
    from .dla import check_dla_request, dla_strongly_typed
    check_precision(precision)
    check_dla_request(dla_core, precision, bundle.batch)
    require_tensorrt("building a TensorRT engine")
    import tensorrt as trt

    major = version_tuple(trt.__version__)[0]
    strongly_typed = major >= 10 if dla_core is None else dla_strongly_typed(major)
    source = _source_graph(bundle, precision, strongly_typed, trt.__version__)
    cfg = bundle.config
    io: dict[str, object] = {k: source.info[k] for k in ("input_format", "output_kind") if k in source.info}
    engine = bundle.root / engine_file(precision)
    meta = build_engine_file(
        bundle.verified_path(source), engine, precision, bundle.batch, source.info.get("input"),
        graph_dims(cfg.preprocess, str(io.get("input_format", "float"))), workspace_mib=workspace_mib, timing_cache=timing_cache,
        version_compatible=version_compatible, hardware_compatible=hardware_compatible,
        strongly_typed=strongly_typed, progress=progress, device=device,
        onnx_sha256=source.sha256 or None, bundle_root=bundle.root, dla_core=dla_core,
        fp32_nodes=source.info.get("fp32_nodes") or ())
    io.update((k, v) for k, v in meta.extra.items() if k == "dla_core")
    info = {"sidecar": sidecar_path(engine).name, "source": source.name,
            "tensorrt_version": meta.tensorrt_version, "gpu": meta.gpu_name,
            "compute_capability": "{}.{}".format(*meta.compute_capability), "strongly_typed": meta.strongly_typed,
            "builder_flags": meta.builder_flags, "workspace_mib": meta.workspace_mib,
            "version_compatible": meta.version_compatible,
            "hardware_compatibility_level": meta.hardware_compatibility_level, **io}
    return bundle.add(Artifact(artifact_name("tensorrt", precision), engine.name, "tensorrt", precision, info=info))



@dataclass(frozen=True)
class BuildOptions:
    """How engines are built: one object for ``build_engines`` and ``cvt-export --format trt``,
    validated here. Fields as in :func:`build_engine`."""

    workspace_mib: int | None = None
    timing_cache: str | os.PathLike[str] | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    dla_core: int | None = None

    def __post_init__(self) -> None:
        from .dla import check_dla_core

        check_dla_core(self.dla_core)
        check_hardware_compatible(self.hardware_compatible)
        if self.workspace_mib is not None and (not isinstance(self.workspace_mib, int) or self.workspace_mib < 1):
            raise CvtDeployError(f"--workspace {self.workspace_mib} MiB is not positive", "pass e.g. --workspace 1024")


def build_engines(bundle: Bundle, precisions: Sequence[str], options: BuildOptions | None = None, *,
                  check: bool = True, data: str | None = None, check_limit: int | None = None,
                  progress: bool = True) -> list[Artifact]:
    """The TensorRT stage of an export: an engine per precision, then (``check``) parity of
    the engines against PyTorch fp32 on this GPU, recorded in the manifest; the same gates
    as the ONNX graphs (:class:`~cvt_deploy.parity.ParityFailure` when one fails)."""
    from ..parity import check_bundle, record_parity

    options = options or BuildOptions()
    require_tensorrt("--format trt")
    built = []
    for precision in precisions:
        art = build_engine(bundle, precision, workspace_mib=options.workspace_mib, timing_cache=options.timing_cache,
                           version_compatible=options.version_compatible,
                           hardware_compatible=options.hardware_compatible, progress=progress,
                           dla_core=options.dla_core)
        print(f"built {bundle.path(art)}", file=sys.stderr)
        built.append(art)
    if check:
        reports = check_bundle(bundle, data=data, limit=check_limit, backends=["tensorrt"], precisions=precisions,
                               progress=progress)
        record_parity(bundle, "tensorrt", reports, show=True)
    return built


def _source_graph(bundle: Bundle, precision: str, strongly_typed: bool, version: str) -> Artifact:
    """The ONNX artifact an engine of ``precision`` is built from on this TensorRT."""
    # Weakly typed (8.6) fp16 = the fp32 graph + FP16 flag; everything else needs its own typed graph.
    want = "fp32" if precision == "fp16" and not strongly_typed else precision
    # Strongly typed int8: the int8+fp16 graph where the bundle has it (else what lies outside
    # Q/DQ would run in fp32), the fp32 Q/DQ graph otherwise.
    art = (bundle.find("onnx", want, "tensorrt-10") if strongly_typed and want == "int8" else None) \
        or bundle.find("onnx", want)
    # Bundles from before --tensorrt existed hold LayerNormalization nodes: written for 8.6 and newer.
    written_for = (art.info.get("tensorrt") or ["8.6", "10"]) if art is not None else []
    if art is not None and version_tuple(version)[:2] == (8, 5) and "8.5" not in written_for:
        raise CvtDeployError(f"bundle {bundle.root}'s graphs are written for TensorRT {', '.join(written_for)} "
                             f"(single LayerNormalization nodes), which TensorRT {version} cannot import",
                             f"re-export the bundle for JetPack 5.1: cvt-export --tensorrt 8.5 --precision {want} "
                             f"--out {bundle.root} (on the machine with PyTorch), then copy it here")
    if art is not None:
        return art
    have = ", ".join(sorted(bundle.artifacts)) or "nothing"
    why = (f"TensorRT {version} builds {precision} engines strongly typed, from the {precision} ONNX graph"
           if strongly_typed and precision != "fp32" else f"a {precision} engine is built from the {want} ONNX graph")
    raise CvtDeployError(f"bundle {bundle.root} has no {want} ONNX graph ({why}); it has: {have}",
                         f"export the bundle with it: cvt-export --precision {precision} --out {bundle.root} "
                         "(on the machine with PyTorch), then copy the bundle here")


def build_engine_file(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str], precision: str,
                      batch: BatchRange, input_name: str | None, chw: tuple[int, int, int], *,
                      workspace_mib: int | None = None, timing_cache: str | os.PathLike[str] | None = None,
                      version_compatible: bool = False, hardware_compatible: bool = False,
                      strongly_typed: bool | None = None, progress: bool = True, device: str | None = None,
                      onnx_sha256: str | None = None, bundle_root: str | os.PathLike[str] | None = None,
                      dla_core: int | None = None, fp32_nodes: Sequence[str] = ()) -> EngineMeta:
    """Build one plan from one ONNX file; write it and its sidecar atomically; return the sidecar record.

    ``input_name``: the graph's image input (None: its only input). ``strongly_typed``:
    None picks by TensorRT version (>= 10: strongly typed). ``fp32_nodes``: ONNX node names
    pinned to fp32 in a weakly typed build (the decomposed LayerNorm of a graph for 8.5), besides
    every Normalization and SoftMax layer. The rest as in :func:`build_engine`.
    """
    require_tensorrt("building a TensorRT engine")
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise CvtDeployError(f"ONNX file {onnx_path} does not exist", "pass a bundle made by cvt-export --format onnx")
    version = trt.__version__
    major = version_tuple(version)[0]
    if version_tuple(version) < MIN_TENSORRT:
        raise CvtDeployError(f"TensorRT {version} is older than 8.5, the oldest that builds CvT engines here",
                             "upgrade TensorRT: JetPack 5.1 ships 8.5, JetPack 6 ships 8.6 or 10.3; on x86 "
                             "pip install 'cvt-deploy[gpu]'")
    if (version_compatible or hardware_compatible) and version_tuple(version) < COMPATIBILITY_TENSORRT:
        raise CvtDeployError(f"TensorRT {version} has no version- or hardware-compatible engines (they start with 8.6)",
                             "build without --version-compatible / --hardware-compatible, on the device that runs it")
    check_hardware_compatible(hardware_compatible)
    if strongly_typed is None:
        strongly_typed = major >= 10
    if strongly_typed and major < 10:
        raise CvtDeployError(f"TensorRT {version} cannot build strongly typed networks (that needs TensorRT 10)",
                             "build with strongly_typed=None to use the builder precision flags")
    if not strongly_typed and major >= 11:
        raise CvtDeployError(f"TensorRT {version} builds strongly typed networks only (no FP16/INT8 builder flags)",
                             "build with strongly_typed=None from the ONNX graph of the wanted precision")
    rebuild_hint = f"cvt-export --format trt --bundle {bundle_root or '<bundle>'} --precision {precision}"

    index = cuda_device_index(device)
    cuda_call(import_cudart().cudaSetDevice(index), f"cudaSetDevice({index})")
    gpu_name, cc = cuda_device_info(index)
    if hardware_compatible and cc < (8, 0):
        raise CvtDeployError(f"hardware-compatible engines need an Ampere or newer GPU to build on (compute capability"
                             f" >= 8.0); {gpu_name} has {cc[0]}.{cc[1]}", "build without --hardware-compatible")
    workspace_mib = _workspace(workspace_mib, index)

    logger = trt_logger()
    builder = trt.Builder(logger)
    if strongly_typed:
        net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:  # 8.x still has implicit-batch networks; ONNX needs explicit batch
        net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    else:
        net_flags = 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    static = _static_findings(onnx_path, version, progress)
    with MESSAGES.capture() as logged:
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or logged
        raise CvtDeployError(
            f"TensorRT {version} cannot parse {onnx_path.name} ({len(errors)} error{'s' * (len(errors) != 1)}): "
            + format_errors(errors) + (f"; the static readiness check found: {'; '.join(static)}" if static else ""),
            "an unsupported operator usually means an op this TensorRT lacks: export the bundle for it "
            "(cvt-export --tensorrt 8.5|8.6|10), or upgrade TensorRT")
    image = _check_io(network, onnx_path, input_name, chw, batch)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    lo, opt, hi = profile_shapes(batch, chw)
    profile.set_shape(image, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)

    flags: list[str] = []

    def set_flag(flag: tensorrt.BuilderFlag) -> None:
        config.set_flag(flag)
        flags.append(flag.name)

    extra: dict[str, object] = {}
    if precision == "fp32":
        # TF32 (on by default) rounds fp32 matmuls to 10-bit mantissas: fp32 must mean fp32 here,
        # or the engine misses the fp32 parity gate against ONNX Runtime.
        config.clear_flag(trt.BuilderFlag.TF32)
        extra["tf32"] = False
    elif not strongly_typed:
        if not builder.platform_has_fast_fp16:
            print(f"warning: {gpu_name} has no fast fp16; the {precision} engine may be no faster than fp32",
                  file=sys.stderr)
        set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the Q/DQ nodes set the scales
        kept = _keep_fp32(network, fp32_nodes)
        if kept:
            set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            extra["fp32_layers"] = len(kept)
    if dla_core is not None:
        from .dla import configure_dla

        flags += configure_dla(builder, config, dla_core)
        extra["dla_core"] = dla_core
    if version_compatible:
        set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    level = trt.HardwareCompatibilityLevel.AMPERE_PLUS if hardware_compatible else trt.HardwareCompatibilityLevel.NONE
    if hardware_compatible:
        config.hardware_compatibility_level = level
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        _attach_timing_cache(config, cache_path)

    if progress:
        kind = "strongly typed" if strongly_typed else "flags " + "+".join(flags or ["none"])
        print(f"building TensorRT {precision} engine from {onnx_path.name} on {gpu_name} (TensorRT {version}, {kind}, "
              f"batch {batch.min}..{batch.max} opt {batch.opt}, workspace {workspace_mib} MiB) ...", file=sys.stderr)
    start = time.perf_counter()
    cancel = threading.Event()
    monitored = progress and attach_progress(config, cancel)
    with MESSAGES.capture() as logged, heartbeat(progress and not monitored):
        plan: tensorrt.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        if cancel.is_set():
            raise KeyboardInterrupt
        raise CvtDeployError(
            f"TensorRT {version} failed to build the {precision} engine from {onnx_path.name}: {format_errors(logged)}",
            f"if it ran out of memory (common on a Jetson): lower --workspace (was {workspace_mib} MiB) or the batch "
            f"maximum (--batch-range, was {batch.max}) and close other GPU programs; then rerun {rebuild_hint}")

    meta = EngineMeta(
        tensorrt_version=version, gpu_name=gpu_name, compute_capability=cc, precision=precision, batch=batch,
        input_name=image, output_name=network.get_output(0).name, chw=chw,
        onnx_sha256=onnx_sha256 or _sha256(onnx_path), onnx_file=onnx_path.name, strongly_typed=strongly_typed,
        builder_flags=flags, workspace_mib=workspace_mib, version_compatible=version_compatible,
        hardware_compatibility_level=level.name, extra=extra)
    with atomic_output(engine_path) as tmp:
        tmp.write_bytes(plan)
        meta.write(sidecar_path(engine_path))  # lands just before the plan; a failure here keeps the old plan
    if cache_path is not None:
        with atomic_output(cache_path) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    if progress:
        size = engine_path.stat().st_size / 2**20
        print(f"built {engine_path.name} ({size:.1f} MiB) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return meta


def _workspace(requested: int | None, index: int) -> int:
    free = cuda_free_memory(index)
    if requested is None:
        return default_workspace_mib(free, index)
    if requested < 1:
        raise CvtDeployError(f"--workspace {requested} MiB is not positive", "pass e.g. --workspace 1024")
    if free is not None and requested << 20 > free:
        # TensorRT treats it as a limit, but tactics that use it fail to allocate (classic on Jetson).
        print(f"warning: workspace {requested} MiB exceeds the free GPU memory ({free >> 20} MiB); if the build "
              f"fails, pass --workspace {default_workspace_mib(free)}", file=sys.stderr)
    return requested


def _parser_error(err: tensorrt.ParserError) -> str:
    where = f"node {err.node()}" if err.node() >= 0 else "graph"
    # node_name / node_operator exist from TensorRT 10 on only.
    name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where += f" {name!r}" if name else ""
    where += f" ({op})" if op else ""
    return f"{where}: {err.desc()} [{err.code()}]"


def _check_io(network: tensorrt.INetworkDefinition, onnx_path: Path, input_name: str | None,
              chw: tuple[int, int, int], batch: BatchRange) -> str:
    """The image input's name, after checking the graph is one NCHW image in, one tensor out."""
    fix = "re-export the bundle with cvt-export (one NCHW image input, one logits output)"
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    if len(ins) != 1 or network.num_outputs != 1:
        raise CvtDeployError(f"{onnx_path.name} has {len(ins)} inputs and {network.num_outputs} outputs; a CvT "
                             "classifier graph has one of each", fix)
    tensor = ins[0]
    if input_name and tensor.name != input_name:
        raise CvtDeployError(f"{onnx_path.name}'s input is {tensor.name!r}, but the bundle says {input_name!r}", fix)
    shape = dims(tensor.shape)
    if len(shape) != 4 or any(s not in (-1, want) for s, want in zip(shape[1:], chw)):
        raise CvtDeployError(f"{onnx_path.name}'s input {tensor.name!r} has shape {shape}; expected (N, {chw[0]}, "
                             f"{chw[1]}, {chw[2]}) for this model", fix)
    if shape[0] != -1 and not batch.min == batch.max == shape[0]:
        raise CvtDeployError(f"{onnx_path.name} has a fixed batch of {shape[0]}, but the engine should take batches "
                             f"{batch.min}..{batch.max}",
                             "re-export with a dynamic batch (cvt-export --batch-range 1:8:32) or the same fixed --batch-range")
    return tensor.name


def _keep_fp32(network: tensorrt.INetworkDefinition, names: Sequence[str] = ()) -> list[str]:
    """Pin every Normalization and SoftMax layer, and the layers named ``names``, to fp32; returns
    the pinned layers' names. By layer type, never by a name pattern: a pattern also catches the
    Q/DQ layers named after a LayerNorm (``layer_norm_3_DequantizeLinear``), and a DQ pinned to
    FLOAT may no longer fuse into its MatMul."""
    import tensorrt as trt

    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    wanted = set(names)
    kept = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX) and layer.name not in wanted:
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE) or not outputs \
                or any(t.dtype not in floats for t in outputs):
            continue  # shape arithmetic and integer tensors must keep their types
        layer.precision = trt.DataType.FLOAT
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.DataType.FLOAT)
        kept.append(layer.name)
    return kept


def _static_findings(onnx_path: Path, version: str, progress: bool) -> list[str]:
    """What the static readiness check says about this graph on this TensorRT (printed as
    warnings before parsing; the real parser decides, and a failure repeats them)."""
    from .readiness import check_readiness, release_of

    key = release_of(version)
    if key is None:
        return []
    report = check_readiness(onnx_path, key)
    errors = [str(f) for f in report.errors]
    if progress:
        for line in errors:
            print(f"warning: {line}", file=sys.stderr)
    return errors


def _attach_timing_cache(config: tensorrt.IBuilderConfig, path: Path) -> None:
    """Load ``path`` into the builder config, or start an empty cache when absent or unusable."""
    blob = path.read_bytes() if path.is_file() else b""
    cache: tensorrt.ITimingCache | None = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if blob:
        print(f"warning: timing cache {path} was made by another TensorRT or GPU; starting a new one there",
              file=sys.stderr)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)


def _sha256(path: Path) -> str:

    return file_sha256(path)
