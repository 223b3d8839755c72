"""A Triton model repository from a bundle, for production Triton containers (NGC ``tritonserver``).

    repo/
      README.md                  the docker run line and how to call the models
      cvt-onnx-fp32/             platform onnxruntime_onnx (CPU or GPU instances, optional ORT-TensorRT)
        config.pbtxt
        labels.txt               wired through label_filename: Triton's classification extension
        1/model.onnx
      cvt-trt-fp16/              platform tensorrt_plan, from the bundle's engine
        config.pbtxt
        labels.txt
        1/model.plan             (+ cc_model_filenames: the GPU the plan was built for)

Triton runs these models natively (no Python): the client sends preprocessed float32 NCHW
pixels (``cvt_deploy.preprocess``) under the graph's input name. Every ``config.pbtxt`` is
parsed with Triton's own schema (``tritonclient``'s ``model_config_pb2``) before anything is
written, and the repository is assembled in a temporary folder that replaces ``out`` only when
complete. :func:`write_model_repository` is the library call; ``cvt-export --format triton``
the command.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import CvtDeployError, require
from ..util import PRECISIONS, scratch_dir
from .protocol import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from ..bundle import Artifact, Bundle

LABELS_FILE = "labels.txt"
MARKER = ".cvt-triton-repository"  # says a folder was written here, so it may be replaced
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class RepositoryOptions:
    """What to write; one object for ``cvt-export --format triton`` and the library, validated here.

    ``precisions``: default every precision the bundle holds. ``device``: instance kind of the
    ONNX models (KIND_CPU / KIND_GPU; TensorRT plans are always GPU). ``ort_tensorrt``: let
    ONNX Runtime hand the ONNX models to TensorRT on the GPU (``precision_mode`` from the
    graph's precision), caching engines. ``max_batch``: default the bundle's maximum.
    ``warmup``: Triton runs a zero batch per instance before it reports the model ready.
    """

    model_name: str = DEFAULT_MODEL_NAME
    precisions: Sequence[str] | None = None
    device: str = "cpu"
    instances: int = 1
    max_batch: int | None = None
    max_queue_delay_us: int = 1000
    ort_tensorrt: bool = False
    warmup: bool = True

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.model_name or ""):
            raise CvtDeployError(f"model name {self.model_name!r} is not a Triton model name",
                                 "use letters, digits, dots, underscores and dashes")
        if self.device not in DEVICES:
            raise CvtDeployError(f"Triton instance device {self.device!r}", f"use one of {', '.join(DEVICES)}")
        if self.ort_tensorrt and self.device != "gpu":
            raise CvtDeployError("the ONNX Runtime TensorRT accelerator runs on the GPU", "add --triton-device gpu")
        for p in self.precisions or ():
            if p not in PRECISIONS:
                raise CvtDeployError(f"unknown precision {p!r}", f"use {', '.join(PRECISIONS)}")
        for what, value, low in (("instances", self.instances, 1), ("max batch", self.max_batch, 1),
                                 ("max queue delay", self.max_queue_delay_us, 0)):
            if value is not None and value < low:
                raise CvtDeployError(f"{what} {value} is below {low}", f"pass {low} or more")


def _config_text(name: str, platform: str, art: Artifact, bundle: Bundle, options: RepositoryOptions,
                  max_batch: int, kind: str, extra: Sequence[str] = ()) -> str:
    """config.pbtxt for one model, in Triton's text format."""
    cfg = bundle.config
    dtype = "TYPE_FP16" if art.info.get("io") == "fp16" else "TYPE_FP32"
    chw = f"[ {cfg.in_chans}, {cfg.img_size}, {cfg.img_size} ]"
    inp, out = art.info.get("input", "pixel_values"), art.info.get("output", "logits")
    batched = max_batch > 0
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             f'input [ {{ name: "{inp}" data_type: {dtype} dims: {chw if batched else _static_dims(bundle)} }} ]',
             f'output [ {{ name: "{out}" data_type: {dtype} dims: [ {"" if batched else f"{bundle.batch.max}, "}'
             f'{cfg.num_classes} ] label_filename: "{LABELS_FILE}" }} ]',
             f"instance_group [ {{ kind: {kind} count: {options.instances} }} ]"]
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}")
    if options.warmup:
        lines.append(f'model_warmup [ {{ name: "zeros" batch_size: 1 inputs {{ key: "{inp}" '
                     f"value: {{ data_type: {dtype} dims: {chw if batched else _static_dims(bundle)} zero_data: true }} }} }} ]")
    lines += extra
    lines.append(f'parameters {{ key: "cvt_deploy.variant" value: {{ string_value: "{cfg.variant}" }} }}')
    lines.append(f'parameters {{ key: "cvt_deploy.precision" value: {{ string_value: "{art.precision}" }} }}')
    return "\n".join(lines) + "\n"


def _static_dims(bundle: Bundle) -> str:
    cfg = bundle.config
    return f"[ {bundle.batch.max}, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size} ]"


def validate_config(text: str, where: str) -> Any:
    """The config parsed with Triton's own schema (a ``ModelConfig`` message); an error naming the problem."""
    require("tritonclient", "serve", "Checking Triton model configs")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise CvtDeployError(f"the generated {where} does not parse with Triton's schema: {e}",
                             "this is a bug in cvt-deploy: report it with the bundle's manifest.json") from None


def _plan_models(bundle: Bundle, precisions: Sequence[str]) -> list[tuple[Artifact, Any]]:
    from ..trt.sidecar import EngineMeta

    out = []
    for p in precisions:
        art = bundle.find("tensorrt", p)
        if art is not None:
            meta = EngineMeta.read(bundle.sidecar_path(art))
            if meta.batch.min > 1:
                raise CvtDeployError(f"the {p} engine's batch profile starts at {meta.batch.min}: Triton sends batches "
                                     "from 1", "rebuild it from a bundle exported with --batch-range 1:OPT:MAX")
            out.append((art, meta))
    return out


def write_model_repository(bundle: Bundle | str | os.PathLike[str], out: str | os.PathLike[str],
                           options: RepositoryOptions | None = None) -> list[str]:
    """Write a Triton model repository for ``bundle`` to ``out``; the names of the models written."""
    from ..bundle import Bundle as _Bundle

    options = options or RepositoryOptions()
    bundle = bundle if isinstance(bundle, _Bundle) else _Bundle.open(bundle)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise CvtDeployError(f"{out} exists and is not a model repository cvt-export wrote; refusing to replace it",
                             "choose a new or empty --out folder")
    precisions = list(options.precisions or [p for p in PRECISIONS if bundle.find("onnx", p) or bundle.find("tensorrt", p)])
    max_batch = options.max_batch or bundle.batch.max
    if bundle.batch.dynamic and bundle.batch.min > 1:
        raise CvtDeployError(f"the bundle's batch range starts at {bundle.batch.min}; Triton forms batches from 1",
                             "re-export with --batch-range 1:OPT:MAX")
    if max_batch > bundle.batch.max:
        raise CvtDeployError(f"max batch {max_batch} is above the bundle's maximum {bundle.batch.max}",
                             f"pass at most {bundle.batch.max}, or re-export with a larger --batch-range")
    if not bundle.batch.dynamic:
        max_batch = 0  # a fixed-batch graph: Triton passes whole [N, C, H, W] tensors, no batching
    # (model name, config text, file to copy, name in the version folder)
    models: list[tuple[str, str, Path, str]] = []
    kind = "KIND_GPU" if options.device == "gpu" else "KIND_CPU"
    for p in precisions:
        art = bundle.find("onnx", p)
        if art is None:
            continue
        extra = []
        if options.ort_tensorrt:
            mode = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}[p]
            extra.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                         f'parameters {{ key: "precision_mode" value: "{mode}" }} '
                         'parameters { key: "max_workspace_size_bytes" value: "1073741824" } '
                         'parameters { key: "trt_engine_cache_enable" value: "1" } '
                         'parameters { key: "trt_engine_cache_path" value: "/tmp/cvt-trt-cache" } } ] } }')
        name = f"{options.model_name}-onnx-{p}"
        models.append((name, _config_text(name, "onnxruntime_onnx", art, bundle, options, max_batch, kind, extra),
                       bundle.verified_path(art), "model.onnx"))
    for art, meta in _plan_models(bundle, precisions):
        cc = f"{meta.compute_capability[0]}.{meta.compute_capability[1]}"
        source = bundle.find("onnx", meta.precision) if art.info.get("source") is None else bundle.artifacts.get(art.info["source"])
        io_art = source or art
        name = f"{options.model_name}-trt-{art.precision}"
        text = _config_text(name, "tensorrt_plan", _with_io(art, io_art, meta), bundle, options,
                            min(max_batch, meta.batch.max), "KIND_GPU",
                            [f'cc_model_filenames [ {{ key: "{cc}" value: "model.plan" }} ]'])
        models.append((name, text, bundle.verified_path(art), "model.plan"))
    if not models:
        raise CvtDeployError(f"bundle {bundle.root} has no ONNX or TensorRT artifact at {', '.join(precisions)}",
                             "export one with cvt-export (or leave out --precision)")
    for name, text, _, _ in models:  # every config against Triton's schema before anything is written
        validate_config(text, f"{name}/config.pbtxt")

    labels = "\n".join(bundle.config.label(i) for i in range(bundle.config.num_classes)) + "\n"
    with scratch_dir(out.parent, out.name) as tmp:
        for name, text, src, file in models:
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
            (tmp / name / LABELS_FILE).write_text(labels)
            shutil.copyfile(src, tmp / name / "1" / file)
            external = src.with_name(src.name + ".data")  # weights saved beside a large graph
            if external.is_file():
                shutil.copyfile(external, tmp / name / "1" / external.name)
        (tmp / "README.md").write_text(_readme(bundle, [m[0] for m in models], options))
        (tmp / MARKER).write_text(f"written by cvt-export --format triton from {bundle.root}\n")
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    return [m[0] for m in models]


def _with_io(engine: Artifact, source: Artifact, meta: Any) -> Artifact:
    """The engine artifact with the input/output names and io precision of the graph it was built from."""
    from ..bundle import Artifact

    info = {**engine.info, "input": meta.input_name or source.info.get("input"),
            "output": meta.output_name or source.info.get("output"), "io": source.info.get("io")}
    return Artifact(engine.name, engine.file, engine.kind, engine.precision, engine.sha256, info)


def _readme(bundle: Bundle, names: Sequence[str], options: RepositoryOptions) -> str:
    cfg = bundle.config
    gpu = options.device == "gpu" or any("-trt-" in n for n in names)
    return f"""# Triton model repository: {cfg.variant}

Written by `cvt-export --format triton` from `{bundle.root}`. Models: {', '.join(f'`{n}`' for n in names)}.

Serve it with NVIDIA's Triton container (pick the release whose TensorRT built the plans, if any:
a plan only runs on the TensorRT version and GPU it was built with):

    docker run --rm {'--gpus all ' if gpu else ''}-p 8000:8000 -p 8001:8001 -p 8002:8002 \\
      -v $PWD:/models nvcr.io/nvidia/tritonserver:24.10-py3 \\
      tritonserver --model-repository=/models

Inputs are preprocessed float32 NCHW pixels, `{cfg.in_chans}x{cfg.img_size}x{cfg.img_size}`, made by
`cvt_deploy.preprocess.preprocess(images, config.preprocess)`; outputs are logits over
{cfg.num_classes} classes. Ask for `class_count=K` to get the top K as "score:index:label".
Several replicas can serve this same folder behind a load balancer.
"""
