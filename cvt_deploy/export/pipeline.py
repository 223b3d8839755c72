"""``export_bundle``: every export stage in order, into a bundle that is checked before it exists.

Stages: weights (safetensors) -> ``export_onnx`` -> ``simplify`` -> ``convert_fp16`` /
``quantize_int8`` on request -> parity of every graph against PyTorch fp32 on real data.
The bundle folder appears only when all of this succeeded (and the gates held, unless
``check=False``); an interrupted or failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..bundle import PRECISIONS, Artifact, BatchRange, Bundle, artifact_name
from ..errors import CvtDeployError
from ..parity import ParityReport, check_runtime, run_batches, summary_table
from ..progress import stage
from .onnx import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx, graph_metadata, simplify, stamp_metadata, tool_versions

if TYPE_CHECKING:
    from ..data import EvalData
    from ..model import CvT

ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


class ParityFailure(CvtDeployError):
    """An artifact missed its precision's gates; ``reports`` say by how much."""

    exit_code = 1  # the CLIs' "ran, but a check failed"

    def __init__(self, reports: list[ParityReport]) -> None:
        self.reports = reports
        failed = [r for r in reports if not r]
        super().__init__(
            "parity gates failed for " + ", ".join(f"{r.candidate} ({'; '.join(r.failed)})" for r in failed),
            "see the table above; keep more ops in higher precision, calibrate on more representative "
            "data (--calib), or pass --no-check to write the bundle anyway")


@dataclass
class ExportResult:
    bundle: Bundle
    reports: list[ParityReport] = field(default_factory=list)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvt-deploy"


def export_bundle(model: CvT, out: str | os.PathLike[str], *, source: str = "", precisions: Sequence[str] = ("fp32",),
                  opset: int = DEFAULT_OPSET, batch: BatchRange = BatchRange(), data: str | None = None,
                  check: bool = True, check_limit: int | None = None, calib: str | None = None,
                  calib_method: str | None = None, calib_count: int | None = None,
                  calib_cache: Path | None = None, progress: bool = True) -> ExportResult:
    """Export ``model`` to a checked bundle in ``out`` (replacing a previous bundle there)."""
    from ..checkpoints import file_sha256, save_checkpoint

    for p in precisions:
        if p not in PRECISIONS:
            raise CvtDeployError(f"unknown precision {p!r}", f"use one or more of {', '.join(PRECISIONS)}")
    cfg = model.cfg
    eval_data = None
    if check:
        from ..data import DEFAULT_LIMIT, load_eval_data

        # Read the check's images first: a bad --data should fail before minutes of export.
        eval_data = load_eval_data(data, cfg, check_limit or DEFAULT_LIMIT, progress)
    src_hash = file_sha256(source) if source and Path(source).is_file() else ""
    extra: dict[str, Any] = {"source": {"checkpoint": source, "sha256": src_hash}, "created_by": tool_versions()}
    result: ExportResult
    with Bundle.create(out, cfg, batch, extra) as bundle:
        save_checkpoint(model, bundle.root / "model.safetensors")
        bundle.add(Artifact("torch-fp32", "model.safetensors", "torch", "fp32"))
        fp32 = bundle.root / ONNX_FILES["fp32"]
        meta = {"source_sha256": src_hash, "versions": extra["created_by"], "batch": batch.to_dict()}
        with stage(f"exporting {cfg.variant} to ONNX (opset {opset})", progress):
            export_onnx(model, fp32, opset=opset, batch=batch, metadata=graph_metadata(cfg.to_json(), "fp32", meta))
        with stage("simplifying with onnxsim", progress):
            simp = simplify(fp32)
        if progress and not simp["simplified"]:
            print(f"  note: not simplified: {simp.get('reason')}", file=sys.stderr)
        bundle.add(Artifact(artifact_name("onnx", "fp32"), fp32.name, "onnx", "fp32",
                            info={"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME, "simplify": simp}))
        for precision in [p for p in PRECISIONS if p in precisions and p != "fp32"]:
            info = _lower_precision(bundle, precision, calib, calib_method, calib_count, calib_cache, progress)
            dst = bundle.root / ONNX_FILES[precision]
            stamp_metadata(dst, graph_metadata(cfg.to_json(), precision, {**meta, "conversion": info}))
            bundle.add(Artifact(artifact_name("onnx", precision), dst.name, "onnx", precision,
                                info={"opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME, **info}))
        result = ExportResult(bundle)
        if check:
            result.reports = check_bundle(bundle, data=eval_data, progress=progress, reference_model=model)
            for rep in result.reports:
                art = bundle.find("onnx", rep.precision)
                if art is not None:
                    art.info["parity"] = rep.to_dict()
            bundle.save()
            if progress:
                print(summary_table(result.reports), file=sys.stderr)
            if not all(result.reports):
                raise ParityFailure(result.reports)
    return result


def _lower_precision(bundle: Bundle, precision: str, calib: str | None, calib_method: str | None,
                     calib_count: int | None, calib_cache: Path | None, progress: bool) -> dict[str, Any]:
    src, dst = bundle.root / ONNX_FILES["fp32"], bundle.root / ONNX_FILES[precision]
    if precision == "fp16":
        from .precision import convert_fp16

        with stage("converting to fp16 (LayerNorm/Softmax kept fp32)", progress):
            return convert_fp16(src, dst)
    from ..calibration import DEFAULT_CALIB_COUNT, load_calibration
    from .precision import quantize_int8

    batch, description = load_calibration(calib, bundle.config, calib_count or DEFAULT_CALIB_COUNT, progress=progress)
    kwargs: dict[str, Any] = {"cache": calib_cache if calib_cache is not None else default_cache_dir() / "calibration",
                              "progress": progress}
    if calib_method:
        kwargs["method"] = calib_method
    with stage(f"quantizing to int8 (Q/DQ) with {len(batch)} calibration images", progress):
        info = quantize_int8(src, dst, batch, **kwargs)
    return {**info, "calibration_data": description}


def check_bundle(bundle: Bundle, *, data: str | EvalData | None = None, limit: int | None = None,
                 backends: Sequence[str] = ("onnxruntime",), precisions: Sequence[str] | None = None,
                 device: str | None = None, progress: bool = True, reference_model: CvT | None = None) -> list[ParityReport]:
    """Parity of the bundle's artifacts (on ``backends``) against PyTorch fp32 on real data.

    The reference is PyTorch fp32 when torch and the bundle's weights are present, else the
    fp32 ONNX graph on ONNX Runtime CPU (so an edge device without torch can check its
    fp16/int8 graphs and engines; that graph is then not checked against itself).
    """
    from ..data import DEFAULT_LIMIT, EvalData, load_eval_data
    from ..runtimes import backend_class, load

    reference, ref_name, ref_artifact = _reference(bundle, reference_model)
    # Decide what is to be checked before the expensive part, so a request that matches
    # nothing fails at once.
    plan = []
    for backend in backends:
        cls = backend_class(backend)
        for art in sorted(bundle.artifacts.values(), key=lambda a: PRECISIONS.index(a.precision)):
            if art.kind == cls.artifact_kind and (not precisions or art.precision in precisions) \
                    and not (backend == "onnxruntime" and art is ref_artifact):
                plan.append((backend, art))
    if not plan:
        raise CvtDeployError(f"nothing to check in {bundle.root} on {', '.join(backends)}"
                             + (f" at {', '.join(precisions)}" if precisions else "")
                             + (f" (the reference is {ref_name})" if ref_artifact is not None else ""),
                             f"build engines with: cvt-export --format trt --onnx {bundle.root}" if "tensorrt" in backends
                             else "export the artifacts first (cvt-export --precision ...), or pick another --backend/--precision")
    ev = data if isinstance(data, EvalData) else load_eval_data(data, bundle.config, limit or DEFAULT_LIMIT, progress)
    with stage(f"reference logits ({ref_name}) on {len(ev)} images", progress):
        ref_logits = run_batches(reference, ev.batch, progress=False)
    reports = []
    for backend, art in plan:
        runtime = load(bundle, backend=backend, device=device, precision=art.precision)
        with stage(f"checking {runtime.describe()}", progress):
            reports.append(check_runtime(runtime, ref_logits, ev.batch, ev.labels, data=ev.description,
                                         progress=False, reference_name=ref_name))
    return reports


def _reference(bundle: Bundle, model: CvT | None) -> tuple[Any, str, Artifact | None]:
    """The reference runtime, its name, and the bundle artifact it runs (None for PyTorch)."""
    from ..runtimes.ort import OrtRuntime
    from ..runtimes.pytorch import TorchRuntime

    if model is not None:
        return TorchRuntime(model, "cpu"), "torch fp32 (cpu)", None
    if TorchRuntime.unavailable_reason() is None and bundle.find("torch", "fp32") is not None:
        return TorchRuntime.from_bundle(bundle), "torch fp32 (cpu)", None
    return OrtRuntime.from_bundle(bundle, "fp32"), "onnxruntime fp32 (cpu; torch not installed)", bundle.find("onnx", "fp32")
