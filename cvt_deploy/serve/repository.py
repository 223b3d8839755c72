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
written, every string from the manifest in it is escaped, labels that would break
``labels.txt`` are refused, and each graph is checked against the manifest's model first.

``out`` is the user's folder as a bundle's is: a new one appears with one rename; into an
existing one (a repository written before, an empty folder, a mount point, a symlink, ``.``)
the files are moved one by one, and :data:`MARKER` lists every file cvt-export wrote there, so
a re-export replaces and removes only those: the user's own model folders and files are kept
(a user's file where a new one goes is refused). :func:`write_model_repository` is the library
call; ``cvt-export --format triton`` the command.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..artifacts import PRECISION, select
from ..errors import CvtDeployError, require
from ..outlock import INNER_LOCK, output_lock
from ..sandbox import plain_name
from ..jsonio import read_json
from ..interrupt import signals_held
from ..util import (PRECISIONS, atomic_write_text, current_umask, remove_path, require_writable, scratch_dir,
                    stale_partials)
from .protocol import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from ..bundle import Artifact, Bundle

LABELS_FILE = "labels.txt"
MARKER = ".cvt-triton-repository"  # lists the files cvt-export wrote here (JSON; older versions: one line of text)
MARKER_FORMAT = "cvt-deploy-triton-repository"
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
    from ..preprocess import graph_dims

    cfg = bundle.config
    dtype = "TYPE_FP16" if art.info.get("io") == "fp16" else "TYPE_FP32"  # decision: the graph's I/O type, not its precision
    out_dtype = dtype
    fmt = art.info.get("input_format", "float")
    if fmt.startswith("uint8"):  # a raw-pixel graph (export/rawpixel.py): uint8 pixels in its own layout
        dtype = "TYPE_UINT8"
    chw = "[ " + ", ".join(map(str, graph_dims(cfg.preprocess, fmt))) + " ]"
    inp, out = quoted(art.info.get("input", "pixel_values")), quoted(art.info.get("output", "logits"))
    batched = max_batch > 0
    static = "[ " + ", ".join(map(str, (bundle.batch.max, *graph_dims(cfg.preprocess, fmt)))) + " ]"
    lines = [f"name: {quoted(name)}", f"platform: {quoted(platform)}", f"max_batch_size: {max_batch}",
             f"input [ {{ name: {inp} data_type: {dtype} dims: {chw if batched else static} }} ]",
             f'output [ {{ name: {out} data_type: {out_dtype} dims: [ {"" if batched else f"{bundle.batch.max}, "}'
             f"{cfg.num_classes} ] label_filename: {quoted(LABELS_FILE)} }} ]",
             f"instance_group [ {{ kind: {kind} count: {options.instances} }} ]"]
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}")
    if options.warmup:
        lines.append(f'model_warmup [ {{ name: "zeros" batch_size: 1 inputs {{ key: {inp} '
                     f"value: {{ data_type: {dtype} dims: {chw if batched else static} zero_data: true }} }} }} ]")
    lines += extra
    lines.append(f'parameters {{ key: "cvt_deploy.variant" value: {{ string_value: {quoted(cfg.variant)} }} }}')
    lines.append(f'parameters {{ key: "cvt_deploy.precision" value: {{ string_value: {quoted(art.precision)} }} }}')
    return "\n".join(lines) + "\n"


def quoted(text: Any) -> str:
    """A protobuf text-format string literal: what the manifest says (a variant, a tensor name)
    can never end the string early and add fields of its own to the config."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(str(text), as_utf8=True) + '"'


def labels_text(bundle: Bundle) -> str:
    """``labels.txt``: one label per line, as Triton's classification extension reads it (no escaping
    exists there, so a label with a line break or another control character is refused)."""
    cfg = bundle.config
    labels = [cfg.label(i) for i in range(cfg.num_classes)]
    for i, label in enumerate(labels):
        if not label.isprintable():
            raise CvtDeployError(f"label {i} of the bundle is {label!r}: a control character or line break in it would "
                                 f"shift every later class in Triton's {LABELS_FILE}",
                                 "re-export with labels of printable characters only (fix id2label or --labels)")
    return "\n".join(labels) + "\n"


def check_graph(bundle: Bundle, art: Artifact) -> None:
    """Refuse a graph whose input or output does not match the model the manifest describes:
    Triton would load it, and answer every request with another model's shapes or classes."""
    import onnx

    from ..preprocess import graph_dims

    path = bundle.verified_path(art)
    graph = onnx.load(str(path), load_external_data=False).graph
    cfg = bundle.config
    weights = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in weights}
    outputs = {o.name: o for o in graph.output}

    def dims(value: Any) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    name_in, name_out = art.info.get("input", "pixel_values"), art.info.get("output", "logits")
    want_in = list(graph_dims(cfg.preprocess, art.info.get("input_format", "float")))
    problem = None
    if name_in not in inputs or name_out not in outputs:
        problem = (f"its inputs are {sorted(inputs)} and outputs {sorted(outputs)}, the manifest says {name_in!r} "
                   f"and {name_out!r}")
    elif dims(inputs[name_in])[1:] != want_in:
        problem = f"its input {name_in!r} is {dims(inputs[name_in])}, the manifest's model takes [N, {want_in}]"
    elif dims(outputs[name_out])[-1:] != [cfg.num_classes]:
        problem = f"its output {name_out!r} is {dims(outputs[name_out])}, the manifest's model has {cfg.num_classes} classes"
    if problem:
        raise CvtDeployError(f"{path.name} does not match the bundle's manifest: {problem}",
                             "re-export the bundle with cvt-export (its graph and manifest are from different exports)")


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


def _portable(bundle: Bundle, precision: str) -> Artifact | None:
    # decision: Triton's onnxruntime_onnx models get the portable graph: every execution provider compiles it
    return bundle.find("onnx", precision)


def _plan_models(bundle: Bundle, precisions: Sequence[str]) -> list[tuple[Artifact, Any]]:
    from ..trt.sidecar import EngineMeta

    out = []
    for p in precisions:
        art = select(bundle, "tensorrt", p, "cuda")
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
    _check_out(out)  # before the graphs are read; again under the lock
    precisions = list(options.precisions or [p for p in PRECISIONS if _portable(bundle, p) or select(bundle, "tensorrt", p, "cuda")])
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
        art = _portable(bundle, p)
        if art is None:
            continue
        extra = []
        if options.ort_tensorrt:
            mode = PRECISION[p].triton_mode
            extra.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                         f'parameters {{ key: "precision_mode" value: "{mode}" }} '
                         'parameters { key: "max_workspace_size_bytes" value: "1073741824" } '
                         'parameters { key: "trt_engine_cache_enable" value: "1" } '
                         'parameters { key: "trt_engine_cache_path" value: "/tmp/cvt-trt-cache" } } ] } }')
        name = f"{options.model_name}-onnx-{p}"
        check_graph(bundle, art)
        models.append((name, _config_text(name, "onnxruntime_onnx", art, bundle, options, max_batch, kind, extra),
                       bundle.verified_path(art), "model.onnx"))
    for art, meta in _plan_models(bundle, precisions):
        expected = (bundle.config.in_chans, bundle.config.img_size, bundle.config.img_size)
        if tuple(meta.chw) != expected:
            raise CvtDeployError(f"the {art.precision} engine takes {tuple(meta.chw)} images, the bundle's manifest "
                                 f"{expected}", "rebuild the engine: cvt-export --format trt --bundle BUNDLE")
        cc = f"{meta.compute_capability[0]}.{meta.compute_capability[1]}"
        # decision: the graph an engine was built from, as its manifest entry names it (older bundles: by precision)
        source = _portable(bundle, meta.precision) if art.info.get("source") is None else bundle.artifacts.get(art.info["source"])
        io_art = source or art
        name = f"{options.model_name}-trt-{art.precision}"
        text = _config_text(name, "tensorrt_plan", _with_io(art, io_art, meta), bundle, options,
                            min(max_batch, meta.batch.max), "KIND_GPU",
                            [f"cc_model_filenames [ {{ key: {quoted(cc)} value: {quoted('model.plan')} }} ]"])
        models.append((name, text, bundle.verified_path(art), "model.plan"))
    if not models:
        raise CvtDeployError(f"bundle {bundle.root} has no ONNX or TensorRT artifact at {', '.join(precisions)}",
                             "export one with cvt-export (or leave out --precision)")
    for name, text, _, _ in models:  # every config against Triton's schema before anything is written
        validate_config(text, f"{name}/config.pbtxt")

    labels = labels_text(bundle)
    with output_lock(out):  # one export at a time into out
        return _write(bundle, out, models, labels, options)


def _write(bundle: Bundle, out: Path, models: list[tuple[str, str, Path, str]], labels: str,
           options: RepositoryOptions) -> list[str]:
    owned = _check_out(out)
    require_writable(out)
    for folder in (out, out.parent):  # what killed runs left
        for stale in stale_partials(folder, "" if folder == out else out.name)[0]:
            remove_path(stale)
    existing = out.is_dir()
    with scratch_dir(out if existing else out.parent, "cvt-triton" if existing else out.name) as tmp:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a repository is meant to be served
        new = ["README.md"]
        for name, text, src, file in models:
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
            (tmp / name / LABELS_FILE).write_text(labels)
            shutil.copyfile(src, tmp / name / "1" / file)
            new += [f"{name}/config.pbtxt", f"{name}/{LABELS_FILE}", f"{name}/1/{file}"]
            external = src.with_name(src.name + ".data")  # weights saved beside a large graph
            if external.is_file():
                shutil.copyfile(external, tmp / name / "1" / external.name)
                new.append(f"{name}/1/{external.name}")
        (tmp / "README.md").write_text(_readme(bundle, [m[0] for m in models], options))
        if existing:
            _install(tmp, out, new, owned or set())
        else:
            _write_marker(tmp, new)
            tmp.rename(out)
    return [m[0] for m in models]


def _check_out(out: Path) -> set[str] | None:
    """Refuse an ``out`` that is a file, or a folder with files cvt-export did not write; the
    files it did write there (None: none)."""
    if out.exists() and not out.is_dir():
        raise CvtDeployError(f"output {out} exists and is not a folder", "choose another --out")
    owned = repository_files(out)
    if out.is_dir() and owned is None and any(p.name != INNER_LOCK for p in out.iterdir()):
        raise CvtDeployError(f"{out} exists and is not a model repository cvt-export wrote; refusing to write into it",
                             "choose a new or empty --out folder")
    return owned


def repository_files(out: Path) -> set[str] | None:
    """The files cvt-export wrote in ``out`` (by its :data:`MARKER`), or None when it wrote none."""
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        raw = read_json(marker)
        files = raw["files"] if isinstance(raw, dict) and raw.get("format") == MARKER_FORMAT else None
    except (OSError, ValueError, KeyError):
        files = None
    if not isinstance(files, list):  # an older cvt-deploy's one-line marker: its models carry our parameters
        files = ["README.md"] + [str(f.relative_to(out)) for d in out.iterdir()
                                 if d.is_dir() and "cvt_deploy.variant" in _text(d / "config.pbtxt")
                                 for f in d.rglob("*") if f.is_file()]
    return {f for f in files if _written_here(out, f)} | {MARKER}


def _written_here(out: Path, name: Any) -> bool:
    """Whether a marker entry can name a file cvt-export wrote: a relative path inside ``out``, spelt
    as it writes them, that is not a folder there. The marker may be hand-edited: a user's folder
    ('photos') or another spelling of a file the new repository writes ('./cvt-onnx-fp32/1/model.onnx')
    would make the replacement remove the user's files or the new model's own."""
    if not isinstance(name, str) or not plain_name(name) or Path(name).as_posix() != name or "/./" in f"/{name}/":
        return False
    path = out / name
    return not (path.is_dir() and not path.is_symlink())


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return ""


def _write_marker(folder: Path, files: Iterable[str]) -> None:
    atomic_write_text(folder / MARKER, json.dumps({"format": MARKER_FORMAT, "files": sorted(set(files))}, indent=1) + "\n")


def _install(tmp: Path, out: Path, new: list[str], owned: set[str]) -> None:
    """Move the new files from ``tmp`` into ``out``; remove the old files of ours the new set lacks;
    keep everything else. The marker lists both sets while files move (a kill leaves them ours)."""
    clashes = [f for f in new if f not in owned and ((out / f).exists() or any(
        (out / parent).exists() and not (out / parent).is_dir() for parent in map(str, Path(f).parents) if parent != "."))]
    if clashes:
        raise CvtDeployError(f"{out} holds files that cvt-export did not write where it writes now: {', '.join(clashes[:5])}; "
                             "refusing to overwrite them", "move them elsewhere, or use another --model-name / --out")
    _write_marker(out, set(new) | (owned - {MARKER}))
    with signals_held():
        for f in new:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f, out / f)
        for f in sorted(owned - set(new) - {MARKER}):
            remove_path(out / f)
            for parent in Path(f).parents:  # folders only we had files in, now empty
                if str(parent) != "." and (out / parent).is_dir() and not any((out / parent).iterdir()):
                    (out / parent).rmdir()
        _write_marker(out, new)


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
