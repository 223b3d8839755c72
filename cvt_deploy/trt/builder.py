"""One ONNX file -> one TensorRT plan: the parse and build that TensorRT and TensorRT-RTX share.

The same code builds on a GPU with NVIDIA's TensorRT (``cvt-export --format trt``) and on any
CPU with TensorRT-RTX (``--format trt-rtx`` and the export's real parse-and-build check), so
CI, which has no GPU, runs the profile, flag, progress and sidecar code that users run. The
differences are the :class:`~cvt_deploy.trt.util.Toolkit`'s, kept explicit here: an
ahead-of-time (TensorRT-RTX) build asks no CUDA device and keeps no timing cache, and builds
strongly typed only, as TensorRT 11 does. Nothing removed in TensorRT 11 (FP16/INT8 builder
flags, calibrators, precision constraints) is touched on a strongly typed build.

Where the precision comes from (docs/tensorrt.md): strongly typed (TensorRT >= 10,
TensorRT-RTX) from the ONNX graph of that precision; weakly typed (8.5/8.6) from the fp32 graph
plus BuilderFlag.FP16 with LayerNorm/Softmax pinned to fp32, int8 from the Q/DQ graph with the
INT8 flag. API that the oldest supported TensorRT (8.5) lacks is reached only where a version
check allows it: :data:`SINCE` lists it (from the bindings' sources per release branch).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..artifacts import PRECISION
from ..errors import CvtDeployError
from ..util import BatchRange, atomic_output, file_sha256
from .progress import attach_progress, heartbeat
from .network import check_io, parse_into, serialize_into, static_findings
from .report import BuildFailed, BuildReport
from .sidecar import EngineMeta, profile_shapes, sidecar_path
from .util import (TENSORRT, Toolkit, check_hardware_compatible, cuda_call, cuda_device_index, cuda_device_info,
                   cuda_free_memory, default_workspace_mib, format_errors, import_cudart, require_tensorrt, trt_logger,
                   version_tuple)

if TYPE_CHECKING:
    import tensorrt

#: Oldest TensorRT that builds here: 8.5 (JetPack 5.1, every Xavier), from graphs exported with
#: ``--tensorrt 8.5`` (it has no LayerNormalization importer); version and hardware
#: compatibility need 8.6.
MIN_TENSORRT = (8, 5)
COMPATIBILITY_TENSORRT = (8, 6)
#: Python API the loader uses that is newer than :data:`MIN_TENSORRT`: first release branch whose
#: bindings have it (TensorRT ``release/8.6`` python/src/infer/pyCore.cpp and pyGraph.cpp; 10.0
#: for the strongly typed flag and the progress monitor). 8.5 raises AttributeError on each.
SINCE = {"HardwareCompatibilityLevel": (8, 6), "LayerType.NORMALIZATION": (8, 6),
         "NetworkDefinitionCreationFlag.STRONGLY_TYPED": (10, 0), "IProgressMonitor": (10, 0)}
#: The GPUs a TensorRT-RTX engine is compiled for, set explicitly so the sidecar states what the
#: plan holds (TensorRT-RTX's default set: compute capability 8.0, 8.6, 8.9 and 12.0; an engine
#: runs on those and later GPUs, compiled for the one it meets at run time).
RTX_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0")
AOT_GPU = "none (ahead-of-time build on the CPU)"


@dataclass(frozen=True)
class BuildOptions:
    """How engines are built: one object for the library and ``cvt-export --format trt|trt-rtx``,
    validated here.

    ``workspace_mib``: builder workspace pool limit (None: 1 GiB, clamped to half the free GPU
    memory; TensorRT-RTX's own limit for an ahead-of-time build). ``timing_cache``: file reused and updated across builds (kernel timings; makes
    rebuilds much faster). ``version_compatible``: the engine also runs on newer TensorRT of the
    same major version. ``hardware_compatible``: the engine runs on every GPU of compute
    capability >= 8.0 (Ampere and newer), possibly a little slower. ``dla_core``: that Jetson DLA
    core, GPU fallback (fp16 only; trt/dla.py).
    """

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

    def check_toolkit(self, toolkit: Toolkit) -> None:
        """Refuse what ``toolkit`` has no meaning for (an ahead-of-time build has no GPU to tune on)."""
        if not toolkit.aot:
            return
        unused = [flag for flag, value in (("--timing-cache", self.timing_cache), ("--version-compatible",
                  self.version_compatible), ("--hardware-compatible", self.hardware_compatible),
                  ("--dla-core", self.dla_core is not None)) if value]
        if unused:
            raise CvtDeployError(f"{', '.join(unused)} cannot apply to {toolkit.name} engines: they are built ahead of "
                                 "time with no GPU (a timing cache makes that build look for one) and run on every "
                                 f"GPU of compute capability {RTX_COMPUTE_CAPABILITIES[0]} and newer",
                                 f"drop {', '.join(unused)}, or build TensorRT engines on the target GPU (--format trt)")


@dataclass(frozen=True)
class PlanSource:
    """The graph one plan is built from, and what the engine must take: the bundle's facts about
    that graph (its file, precision, batch range, input name and pixel dims, the nodes its
    export pinned to fp32, its recorded sha256), beside the :class:`BuildOptions` of the build."""

    onnx_path: Path
    precision: str
    batch: BatchRange
    input_name: str | None
    chw: tuple[int, int, int]
    fp32_nodes: Sequence[str] = ()
    onnx_sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx_path", Path(self.onnx_path))
        object.__setattr__(self, "fp32_nodes", tuple(self.fp32_nodes))


@dataclass
class Built:
    plan: tensorrt.IHostMemory  # bytes-like
    meta: EngineMeta
    report: BuildReport


def build_plan(source: PlanSource, options: BuildOptions | None = None, *, toolkit: Toolkit = TENSORRT,
                    strongly_typed: bool | None = None, progress: bool = True, device: str | None = None,
                    rebuild_hint: str = "") -> Built:
    """Parse and build one plan in memory (nothing written); :class:`BuildFailed` with every parser
    or builder message when either refuses. ``strongly_typed``: None picks by toolkit and version."""
    options = options or BuildOptions()
    options.check_toolkit(toolkit)
    module = require_tensorrt(f"building a {toolkit.name} engine", toolkit)
    if TYPE_CHECKING:
        import tensorrt as trt  # checked against tensorrt-stubs; TensorRT-RTX has the same API for all used here
    else:
        trt = module
    onnx_path, batch = source.onnx_path, source.batch
    if not onnx_path.is_file():
        raise CvtDeployError(f"ONNX file {onnx_path} does not exist", "pass a bundle made by cvt-export --format onnx")
    version = str(trt.__version__)
    strongly_typed = _typing(toolkit, version, strongly_typed, options)
    report = BuildReport(onnx_path.name, toolkit.name, version, source.precision)
    rebuild_hint = rebuild_hint or f"cvt-export --format {toolkit.format} --bundle <bundle>"
    gpu_name, cc, workspace_mib = _target_gpu(toolkit, options, device)

    logger = trt_logger(toolkit)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(module, version, strongly_typed, toolkit))
    start = _parse(trt.OnnxParser(network, logger), network, report, toolkit, onnx_path, progress)
    image = check_io(network, onnx_path, source.input_name, source.chw, batch)

    config, workspace_mib = _new_config(module, builder, image, source, workspace_mib)
    flags, extra = _configure(module, builder, config, network, source.precision, version, strongly_typed, options,
                              source.fp32_nodes, gpu_name)
    targets = set_rtx_targets(module, config) if toolkit.aot else []
    level = _compatibility_level(module, config, version, options)
    cache_path = Path(options.timing_cache) if options.timing_cache is not None else None
    if cache_path is not None:
        _attach_timing_cache(config, cache_path)

    if progress:
        kind = "strongly typed" if strongly_typed else "flags " + "+".join(flags or ["none"])
        print(f"building {toolkit.name} {source.precision} engine from {onnx_path.name} on {gpu_name} ({toolkit.name} "
              f"{version}, {kind}, batch {batch.min}..{batch.max} opt {batch.opt}, workspace {workspace_mib} MiB) ...",
              file=sys.stderr)
    plan = _serialize(module, builder, network, config, report, start, progress)
    if plan is None:
        raise BuildFailed(
            f"{toolkit.name} {version} failed to build the {source.precision} engine from {onnx_path.name}: "
            f"{format_errors(report.errors)}",
            f"if it ran out of memory (common on a Jetson): lower --workspace (was {workspace_mib} MiB) or the batch "
            f"maximum (--batch-range, was {batch.max}) and close other GPU programs; then rerun {rebuild_hint}", report)
    meta = EngineMeta(
        tensorrt_version=version, gpu_name=gpu_name, compute_capability=cc, precision=source.precision, batch=batch,
        input_name=image, output_name=network.get_output(0).name, chw=source.chw,
        onnx_sha256=source.onnx_sha256 or file_sha256(onnx_path), onnx_file=onnx_path.name, strongly_typed=strongly_typed,
        builder_flags=flags, workspace_mib=workspace_mib, version_compatible=options.version_compatible,
        hardware_compatibility_level=level, toolkit=toolkit.name, targets=targets, extra=extra)
    if cache_path is not None:
        with atomic_output(cache_path) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    return Built(plan, meta, report)


def build_engine_file(source: PlanSource, engine_path: str | os.PathLike[str], options: BuildOptions | None = None,
                           *, toolkit: Toolkit = TENSORRT, strongly_typed: bool | None = None, progress: bool = True,
                           device: str | None = None, rebuild_hint: str = "") -> Built:
    """:func:`build_plan`, then the plan and its sidecar written atomically (a failure keeps the old plan)."""
    start = time.perf_counter()
    built = build_plan(source, options, toolkit=toolkit, strongly_typed=strongly_typed, progress=progress,
                            device=device, rebuild_hint=rebuild_hint)
    engine_path = Path(engine_path)
    with atomic_output(engine_path) as tmp:
        tmp.write_bytes(built.plan)
        built.meta.write(sidecar_path(engine_path))  # lands just before the plan
    if progress:
        size = engine_path.stat().st_size / 2**20
        print(f"built {engine_path.name} ({size:.1f} MiB) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return built


def _target_gpu(toolkit: Toolkit, options: BuildOptions, device: str | None) -> tuple[str, tuple[int, int], int | None]:
    """(GPU name, compute capability, workspace MiB or None for the toolkit's own) of this build."""
    if toolkit.aot:
        # No device memory to share: TensorRT-RTX's own limit unless asked (the 1 GiB that suits a Jetson
        # failed CvT-13's fp32 build at batch 32: one tactic asked for 1.1 GB).
        return AOT_GPU, (0, 0), options.workspace_mib
    index = cuda_device_index(device)
    cuda_call(import_cudart().cudaSetDevice(index), f"cudaSetDevice({index})")
    gpu_name, cc = cuda_device_info(index)
    if options.hardware_compatible and cc < (8, 0):
        raise CvtDeployError(f"hardware-compatible engines need an Ampere or newer GPU to build on (compute "
                             f"capability >= 8.0); {gpu_name} has {cc[0]}.{cc[1]}", "build without --hardware-compatible")
    return gpu_name, cc, _workspace(options.workspace_mib, index)


def _parse(parser: tensorrt.OnnxParser, network: tensorrt.INetworkDefinition, report: BuildReport, toolkit: Toolkit,
           onnx_path: Path, progress: bool) -> float:
    """Parse the graph into ``network``, the static findings said first (a GPU build's; they come
    back in the error when the parser refuses); returns when the build's clock started."""
    static = static_findings(onnx_path, report.version, progress) if not toolkit.aot else []
    start = time.perf_counter()
    if not parse_into(report, parser, network, onnx_path):
        raise BuildFailed(
            f"{toolkit.name} {report.version} cannot parse {onnx_path.name} ({len(report.errors)} error"
            f"{'s' * (len(report.errors) != 1)}): " + format_errors(report.errors)
            + (f"; the static readiness check found: {'; '.join(static)}" if static else ""),
            "an unsupported operator usually means an op this TensorRT lacks: export the bundle for it "
            "(cvt-export --tensorrt 8.5|8.6|10), or upgrade TensorRT", report)
    return start


def _new_config(module: Any, builder: tensorrt.Builder, image: str, source: PlanSource,
                workspace_mib: int | None) -> tuple[tensorrt.IBuilderConfig, int]:
    """A builder config with the workspace limit (None: the toolkit's own) and the batch profile of
    the input ``image``; returns it with the limit it holds, MiB."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = module
    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    workspace_mib = config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) >> 20
    profile = builder.create_optimization_profile()
    lo, opt, hi = profile_shapes(source.batch, source.chw)
    profile.set_shape(image, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    return config, workspace_mib


def _compatibility_level(module: Any, config: tensorrt.IBuilderConfig, version: str, options: BuildOptions) -> str:
    """The hardware compatibility level set on ``config`` (8.5 has none: refused before, by _typing)."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = module
    if options.hardware_compatible and version_tuple(version) >= SINCE["HardwareCompatibilityLevel"]:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        return "AMPERE_PLUS"
    return "NONE"


def _serialize(module: Any, builder: tensorrt.Builder, network: tensorrt.INetworkDefinition,
               config: tensorrt.IBuilderConfig, report: BuildReport, start: float,
               progress: bool) -> tensorrt.IHostMemory | None:
    """The plan, or None when the builder made none; Ctrl-C in TensorRT's progress monitor cancels it."""
    cancel = threading.Event()
    monitored = progress and attach_progress(module, config, cancel)  # False where there is none (8.x: SINCE)
    with heartbeat(progress and not monitored):
        plan = serialize_into(report, builder, network, config, start)
    if plan is None and cancel.is_set():
        raise KeyboardInterrupt
    return plan


def _typing(toolkit: Toolkit, version: str, strongly_typed: bool | None, options: BuildOptions) -> bool:
    """Whether this build is strongly typed, after refusing what this toolkit and version cannot do."""
    if toolkit.aot:  # TensorRT-RTX: strongly typed only, its own version numbers
        if strongly_typed is False:
            raise CvtDeployError(f"{toolkit.name} builds strongly typed networks only",
                                 "build from the ONNX graph of the wanted precision")
        return True
    ver = version_tuple(version)
    if ver < MIN_TENSORRT:
        raise CvtDeployError(f"TensorRT {version} is older than 8.5, the oldest that builds CvT engines here",
                             "upgrade TensorRT: JetPack 5.1 ships 8.5, JetPack 6 ships 8.6 or 10.3; on x86 "
                             "pip install 'cvt-deploy[gpu]'")
    if (options.version_compatible or options.hardware_compatible) and ver < COMPATIBILITY_TENSORRT:
        raise CvtDeployError(f"TensorRT {version} has no version- or hardware-compatible engines (they start with 8.6)",
                             "build without --version-compatible / --hardware-compatible, on the device that runs it")
    typed = ver[0] >= 10 if strongly_typed is None else strongly_typed
    if typed and ver < SINCE["NetworkDefinitionCreationFlag.STRONGLY_TYPED"]:
        raise CvtDeployError(f"TensorRT {version} cannot build strongly typed networks (that needs TensorRT 10)",
                             "build with strongly_typed=None to use the builder precision flags")
    if not typed and ver[0] >= 11:
        raise CvtDeployError(f"TensorRT {version} builds strongly typed networks only (no FP16/INT8 builder flags)",
                             "build with strongly_typed=None from the ONNX graph of the wanted precision")
    return typed


def network_flags(module: Any, version: str, strongly_typed: bool, toolkit: Toolkit) -> int:
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = module
    if strongly_typed and (toolkit.aot or version_tuple(version) >= SINCE["NetworkDefinitionCreationFlag.STRONGLY_TYPED"]):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if not toolkit.aot and version_tuple(version)[0] < 10:  # 8.x still has implicit-batch networks
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _configure(module: Any, builder: tensorrt.Builder, config: tensorrt.IBuilderConfig,
               network: tensorrt.INetworkDefinition, precision: str, version: str, strongly_typed: bool,
               options: BuildOptions, fp32_nodes: Sequence[str], gpu_name: str) -> tuple[list[str], dict[str, object]]:
    """The builder flags of this precision; returns (flag names set, sidecar extras)."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = module
    flags: list[str] = []

    def set_flag(flag: tensorrt.BuilderFlag) -> None:
        config.set_flag(flag)
        flags.append(flag.name)

    extra: dict[str, object] = {}
    wanted = PRECISION[precision].trt_flags
    if not wanted:
        # TF32 (on by default) rounds fp32 matmuls to 10-bit mantissas: fp32 must mean fp32 here,
        # or the engine misses the fp32 parity gate against ONNX Runtime.
        config.clear_flag(trt.BuilderFlag.TF32)
        extra["tf32"] = False
    elif not strongly_typed:
        if not builder.platform_has_fast_fp16:
            print(f"warning: {gpu_name} has no fast fp16; the {precision} engine may be no faster than fp32",
                  file=sys.stderr)
        for name in wanted:
            set_flag(getattr(trt.BuilderFlag, name))
        kept = _keep_fp32(module, network, version, fp32_nodes)
        if kept:
            set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            extra["fp32_layers"] = len(kept)
    if options.dla_core is not None:
        from .dla import configure_dla

        flags += configure_dla(builder, config, options.dla_core)
        extra["dla_core"] = options.dla_core
    if options.version_compatible:
        set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    return flags, extra


def set_rtx_targets(module: Any, config: Any) -> list[str]:
    """The compute capabilities a TensorRT-RTX engine is compiled for (TensorRT-RTX-only API,
    hence untyped: tensorrt-stubs do not know it; CI's RTX builds run it)."""
    targets = list(RTX_COMPUTE_CAPABILITIES)
    config.num_compute_capabilities = len(targets)
    for i, target in enumerate(targets):
        if not config.set_compute_capability(getattr(module.ComputeCapability, "SM" + target.replace(".", "")), i):
            raise CvtDeployError(f"TensorRT-RTX {module.__version__} refused compute capability {target}",
                                 "upgrade tensorrt-rtx (pip install -U tensorrt-rtx)")
    return targets


def _workspace(requested: int | None, index: int) -> int:
    free = cuda_free_memory(index)
    if requested is None:
        return default_workspace_mib(free, index)
    if free is not None and requested << 20 > free:
        # TensorRT treats it as a limit, but tactics that use it fail to allocate (classic on Jetson).
        print(f"warning: workspace {requested} MiB exceeds the free GPU memory ({free >> 20} MiB); if the build "
              f"fails, pass --workspace {default_workspace_mib(free)}", file=sys.stderr)
    return requested


def _keep_fp32(module: Any, network: tensorrt.INetworkDefinition, version: str, names: Sequence[str] = ()) -> list[str]:
    """Pin every Normalization and SoftMax layer, and the layers named ``names``, to fp32; returns
    the pinned layers' names. By layer type, never by a name pattern: a pattern also catches the
    Q/DQ layers named after a LayerNorm (``layer_norm_3_DequantizeLinear``), and a DQ pinned to
    FLOAT may no longer fuse into its MatMul. 8.5 has no Normalization layer type (SINCE): its
    graphs write LayerNorm out, and ``names`` lists those nodes."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = module
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    pinned = {trt.LayerType.SOFTMAX}
    if version_tuple(version) >= SINCE["LayerType.NORMALIZATION"]:
        pinned.add(trt.LayerType.NORMALIZATION)
    wanted = set(names)
    kept = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in pinned and layer.name not in wanted:
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
