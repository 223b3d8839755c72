"""DeepStream: an ``nvinfer`` classifier config and label file for a bundle, and what its resize costs.

``write_deepstream`` reads a bundle and writes, beside its graphs and atomically:

    nvinfer_config.txt   Gst-nvinfer config (GLib key file, group [property]); in the manifest
                         as the ``deepstream-<precision>`` artifact
    labels.txt           the class labels in nvinfer's classifier format: one line, ';' between

What nvinfer does, per its plugin manual (Gst-nvinfer, "Gst-nvinfer File Configuration
Specifications"; https://docs.nvidia.com/metropolis/deepstream/dev-guide/text/DS_plugin_gst-nvinfer.html):
it scales the frame (or an object's crop) straight to the network's size (no resize then
center crop), computes ``y = net-scale-factor * (x - offsets[c])`` with ONE scalar scale,
and passes *float* planar data to the engine. Hence:

* a ``float-pixels`` graph (float32 NCHW 0..255, normalising itself) is exact with
  ``net-scale-factor=1`` and zero offsets: the one DeepStream-ready input format;
* a ``float`` graph (ImageNet-normalised input) only approximately: per-channel std cannot
  be expressed, so the config uses the averaged std (NVIDIA's forum advice) and the top-1
  agreement with exact normalisation is measured and printed;
* a ``uint8-*`` graph is refused: nvinfer never hands an engine uint8.

nvinfer's built-in classifier parser thresholds probabilities, so the graph must end in a
softmax (``--output probs``). :func:`check_resize` measures what the direct resize costs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import PRECISION, REFERENCE, artifact_file, select
from ..bundle import Artifact, artifact_name
from ..bundle_write import changing
from ..errors import CvtDeployError
from ..util import atomic_write_text, check_choice

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..config import CvtConfig
    from ..data import EvalData
    from ..parity import ParityReport

CONFIG_FILE = artifact_file("deepstream", REFERENCE)  # one per bundle, whatever its precision
LABELS_FILE = "labels.txt"
MODES = ("primary", "secondary")
#: nvinfer's network-mode value per precision (the registry's: artifacts.PRECISION).
NETWORK_MODE = {p.name: p.nvinfer_mode for p in PRECISION.values()}
#: Agreement below this with exact normalisation is called out when approximating.
APPROX_WARN = 0.99


@dataclass(frozen=True)
class DeepStreamOptions:
    """What the config says. ``precision``: which graph/engine (None: fp16 if the bundle has
    it, else fp32). ``mode``: primary (whole frames) or secondary (objects of the
    ``operate_on_gie_id`` detector). ``batch_size``: None = the bundle's optimal batch.
    ``threshold``: nvinfer's classifier-threshold, the lowest probability it attaches."""

    precision: str | None = None
    mode: str = "primary"
    operate_on_gie_id: int = 1
    batch_size: int | None = None
    threshold: float = 0.5
    data: str | None = None    # images for measuring an approximation (default demo digits)
    limit: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.mode, MODES, "DeepStream mode")
        if self.precision is not None:
            check_choice(self.precision, tuple(NETWORK_MODE), "DeepStream precision")
        if not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise CvtDeployError(f"classifier threshold {self.threshold!r} is not a probability", "pass 0..1, e.g. 0.5")
        for name in ("operate_on_gie_id", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CvtDeployError(f"DeepStream {name.replace('_', '-')} {value!r} is not a whole number >= 1",
                                     "omit it for the default")


@dataclass
class DeepStreamResult:
    config: Path
    labels: Path
    exact: bool                                 # False: the averaged-std approximation
    approximation: ParityReport | None = None   # its measured agreement with exact normalisation


def labels_text(cfg: CvtConfig) -> str:
    """nvinfer's classifier label file: the labels of one output on one line, ';' between them."""
    labels = [cfg.label(i) for i in range(cfg.num_classes)]
    for label in labels:
        if not label or any(c in label for c in ";\n\r"):
            raise CvtDeployError(f"label {label!r} cannot be written to a DeepStream label file (';' separates labels, "
                                 "one line per output)", "rename the label in the checkpoint's config and re-export")
    return ";".join(labels) + "\n"


def write_deepstream(bundle: Bundle, options: DeepStreamOptions | None = None, progress: bool = True) -> DeepStreamResult:
    """Write ``nvinfer_config.txt`` and ``labels.txt`` into ``bundle`` (see the module doc)."""
    options = options or DeepStreamOptions()
    # decision: DeepStream's default is fp16 (a Jetson's usual engine) where the bundle has it
    precision = options.precision or ("fp16" if bundle.find("onnx", "fp16") else "fp32")
    graph = bundle.require("onnx", precision)  # decision: nvinfer's onnx-file is the portable graph of that precision
    fmt, kind = graph.info.get("input_format", "float"), graph.info.get("output_kind", "logits")
    check_graph_io(fmt, kind, f"{bundle.root}'s {precision} graph", precision)
    engine = select(bundle, "tensorrt", precision, "cuda")
    if not PRECISION[precision].nvinfer_builds and engine is None:
        raise CvtDeployError(f"an {precision} config needs the {precision} engine in the bundle: nvinfer builds "
                             f"{precision} with implicit calibration (int8-calib-file), which explicit Q/DQ graphs do "
                             "not use", f"build it on the device first: cvt-export --format trt --bundle {bundle.root} "
                                        f"--precision {precision}")
    check_free(bundle.root)
    cfg = bundle.config
    approximation = None
    if fmt == "float-pixels":
        scale, offsets = 1.0, [0.0] * cfg.in_chans
    else:
        scale, offsets = averaged_std(cfg)
        approximation = measure_averaged_std(bundle, graph, options, progress)
    batch = options.batch_size or bundle.batch.opt
    if not bundle.batch.min <= batch <= bundle.batch.max:
        raise CvtDeployError(f"DeepStream batch size {batch} is outside the bundle's batch range "
                             f"{bundle.batch.min}..{bundle.batch.max}", "pick a batch inside it, or re-export with --batch-range")
    text = nvinfer_config(cfg, graph, engine, precision, batch, scale, offsets, options, approximation)
    info: dict[str, Any] = {"labels": LABELS_FILE, "source": graph.name, "exact": approximation is None}
    if engine is not None:
        info["engine"] = engine.name
    if approximation is not None:
        info["parity"] = approximation.to_dict()
    with changing(bundle):
        atomic_write_text(bundle.new_file(LABELS_FILE), labels_text(cfg))
        # After the labels: a config only ever names a label file that is in place.
        atomic_write_text(bundle.new_file(CONFIG_FILE), text)
        # The manifest lists the config as the bundle's, so copies carry it and a re-export
        # replaces it; one config per bundle, whatever precision it was written for.
        for name in [n for n, a in bundle.artifacts.items() if a.kind == "deepstream"]:  # decision: as said above
            del bundle.artifacts[name]
        bundle.add(Artifact(artifact_name("deepstream", precision), CONFIG_FILE, "deepstream", precision, info=info))
    return DeepStreamResult(bundle.root / CONFIG_FILE, bundle.root / LABELS_FILE, approximation is None, approximation)


def check_free(root: Path) -> None:
    """Refuse to overwrite a config or label file in ``root`` that is not its bundle's (a user's own)."""
    from ..bundle_write import bundle_files

    ours = bundle_files(root) or set()
    taken = [name for name in (CONFIG_FILE, LABELS_FILE) if (root / name).exists() and name not in ours]
    if taken:
        raise CvtDeployError(f"{root} holds {' and '.join(taken)}, which are not part of its bundle; refusing to "
                             "overwrite them", "move them elsewhere, or export to another --out")


def check_graph_io(input_format: str, output_kind: str, what: str, precision: str = "fp16") -> None:
    """Refuse graphs nvinfer cannot feed or read (see the module doc), with the export that fixes it."""
    redo = f"cvt-export --format deepstream --input-format float-pixels --output probs --precision {precision} (same --weights)"
    if input_format.startswith("uint8"):
        raise CvtDeployError(f"{what} takes {input_format} pixels, but nvinfer hands an engine float data (its plugin "
                             "manual: it produces float planar RGB for TensorRT)", f"export for DeepStream: {redo}")
    if output_kind != "probs":
        raise CvtDeployError(f"{what} gives logits; nvinfer's classifier parser thresholds softmax probabilities",
                             f"export with --output probs: {redo}")


def averaged_std(cfg: CvtConfig) -> tuple[float, list[float]]:
    """nvinfer's ``net-scale-factor`` and ``offsets`` closest to the model's normalisation:
    (x/255 - mean_c)/std_c = (x - 255 mean_c) / (255 std_c), with std_c replaced by its mean."""
    pre = cfg.preprocess
    return 1.0 / (255.0 * float(np.mean(pre.std))), [255.0 * m for m in pre.mean]


def measure_averaged_std(bundle: Bundle, graph: Artifact, options: DeepStreamOptions, progress: bool) -> ParityReport:
    """Top-1 agreement (and accuracy) of ``graph`` on averaged-std input vs exact normalisation."""
    from ..data import DEFAULT_LIMIT, load_eval_data
    from ..parity import Gates, compare, run_batches
    from ..preprocess import pixels_from_batch
    from ..runtimes.ort import OrtRuntime

    cfg = bundle.config
    ev = load_eval_data(options.data, cfg, options.limit or DEFAULT_LIMIT, progress)
    scale, offsets = averaged_std(cfg)
    pixels = pixels_from_batch(ev.batch, cfg.preprocess).astype(np.float32)
    approx = (scale * (pixels - np.asarray(offsets, np.float32))).transpose(0, 3, 1, 2)
    runtime = OrtRuntime.from_bundle(bundle, graph.precision)
    exact_logits = run_batches(runtime, ev.batch, progress=False)
    approx_logits = run_batches(runtime, np.ascontiguousarray(approx, dtype=np.float32), progress=False)
    report = compare(exact_logits, approx_logits, ev.labels, precision=graph.precision, gates=Gates(),
                     candidate_name="nvinfer averaged-std input", reference_name="exact normalisation",
                     data=ev.description)
    if progress:
        warn = "  WARNING: below 99%; export --input-format float-pixels for exact input" \
            if report.top1_agreement < APPROX_WARN else ""
        print(f"DeepStream averaged-std approximation (net-scale-factor {scale:.6g}, offsets "
              f"{';'.join(f'{o:.3f}' for o in offsets)}): top-1 agreement with exact normalisation "
              f"{100 * report.top1_agreement:.2f}% on {report.images} images" + _accuracy(report) + warn, file=sys.stderr)
    return report


def _accuracy(report: ParityReport) -> str:
    if report.accuracy_reference is None or report.accuracy_candidate is None:
        return ""
    return f", accuracy {100 * report.accuracy_reference:.2f}% -> {100 * report.accuracy_candidate:.2f}%"


def nvinfer_config(cfg: CvtConfig, graph: Artifact, engine: Artifact | None, precision: str, batch: int, scale: float,
                   offsets: list[float], options: DeepStreamOptions, approximation: ParityReport | None) -> str:
    """The config text. Every key is one the Gst-nvinfer plugin manual documents in its
    "Gst-nvinfer Property Group Supported Keys" table (DeepStream 6.x/7.x; link in the module doc)."""
    note = ("exact: the graph normalises float32 0..255 pixels itself" if approximation is None else
            f"APPROXIMATE: averaged std; top-1 agreement with exact normalisation "
            f"{100 * approximation.top1_agreement:.2f}% on {approximation.images} images")
    secondary = options.mode == "secondary"
    keys: list[tuple[str, Any]] = [
        ("net-scale-factor", f"{scale:.9g}"),
        ("offsets", ";".join(f"{o:.6g}" for o in offsets)),
        ("model-color-format", 0 if cfg.in_chans == 3 else 2),  # 0 RGB (our graphs), 2 GRAY
        ("onnx-file", graph.file),
    ]
    if engine is not None:
        keys.append(("model-engine-file", engine.file))
    keys += [
        ("labelfile-path", LABELS_FILE),
        ("batch-size", batch),
        ("network-mode", NETWORK_MODE[precision]),
        ("network-type", 1),                      # classifier
        ("process-mode", 2 if secondary else 1),  # 1 primary (frames), 2 secondary (objects)
        ("gie-unique-id", 2 if secondary else 1),
    ]
    if secondary:
        keys.append(("operate-on-gie-id", options.operate_on_gie_id))
    keys += [
        ("infer-dims", f"{cfg.in_chans};{cfg.img_size};{cfg.img_size}"),
        ("network-input-order", 0),               # NCHW
        ("output-blob-names", graph.info.get("output", "probs")),
        ("classifier-threshold", f"{options.threshold:g}"),
        ("maintain-aspect-ratio", 0),             # squash to the network size, as check_resize measures
        ("scaling-filter", 1),                    # bilinear
    ]
    head = [f"# Gst-nvinfer config written by cvt-deploy for {cfg.variant} ({precision}); {note}.",
            "# Keys: Gst-nvinfer plugin manual, https://docs.nvidia.com/metropolis/deepstream/dev-guide/text/DS_plugin_gst-nvinfer.html",
            "# Paths are relative to this file. Run it with e.g.:",
            f"#   gst-launch-1.0 uridecodebin uri=file:///path/video.mp4 ! m.sink_0 nvstreammux name=m batch-size=1 "
            f"width=1280 height=720 ! nvinfer config-file-path={CONFIG_FILE} ! fakesink",
            "[property]"]
    return "\n".join(head + [f"{k}={v}" for k, v in keys]) + "\n"


def check_resize(bundle: Bundle, *, data: str | EvalData | None = None, limit: int | None = None,
                 backend: str = "onnxruntime", precision: str | None = None, device: str | None = None,
                 progress: bool = True) -> ParityReport:
    """What DeepStream's direct bilinear resize to the network size costs: the same artifact on
    the model's own preprocessing (reference) and on nvinfer-style input (candidate); accuracy
    of each and their top-1 agreement. Not gated: it informs, it does not fail.

    PIL's bilinear filter stands in for nvinfer's scaler (VIC/GPU): the figure is the cost of
    skipping resize-then-crop and the model's filter, not of one scaler against another.
    """
    from ..data import DEFAULT_LIMIT, EvalData, load_eval_data
    from ..parity import Gates, compare, run_streamed
    from ..backends import load

    if data is not None and not isinstance(data, (str, Path)):
        raise CvtDeployError("check_resize reads images itself", "pass an image folder or None (demo digits)")
    cfg = bundle.config
    ds_cfg = replace(cfg, preprocess=replace(cfg.preprocess, resize="squash", interpolation="bilinear", crop_pct=1.0))
    own: EvalData = load_eval_data(data, cfg, limit or DEFAULT_LIMIT, progress)
    direct: EvalData = load_eval_data(data, ds_cfg, limit or DEFAULT_LIMIT, False)
    runtime = load(bundle, backend=backend, device=device, precision=precision)
    (ref,), (cand,) = run_streamed([runtime], own, progress), run_streamed([runtime], direct, progress)
    return compare(ref, cand, own.labels, precision=runtime.precision, gates=Gates(),
                   candidate_name=f"{runtime.describe()}, DeepStream resize (direct, bilinear)",
                   reference_name=f"{runtime.describe()}, model preprocessing ({_describe(cfg)})",
                   data=own.description)


def format_resize(report: ParityReport) -> str:
    """The resize check as a user reads it: accuracy under each preprocessing and their agreement."""
    from ..table import format_table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    table = format_table(["preprocessing", "accuracy"], [[report.reference, pct(report.accuracy_reference)],
                                                         [report.candidate, pct(report.accuracy_candidate)]],
                         title=f"DeepStream resize on {report.images} images ({report.data})")
    drop = "" if report.accuracy_drop is None else f"; accuracy change {-report.accuracy_drop:+.2f} points"
    return f"{table}\ntop-1 agreement with the model's preprocessing: {100 * report.top1_agreement:.2f}%" \
           f" (top-5 overlap {100 * report.top5_overlap:.2f}%){drop}"


def _describe(cfg: CvtConfig) -> str:
    pre = cfg.preprocess
    how = "resize to size" if pre.resize == "squash" else f"shorter side to {int(pre.size / pre.crop_pct)}, center crop"
    return f"{how}, {pre.interpolation}"
