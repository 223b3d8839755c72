"""PyTorch CvT -> ONNX: ``export_onnx`` and ``simplify``, plus the graph's own metadata.

Opset 17 by default: the first opset with a single LayerNormalization node (which TensorRT
maps to its own normalisation layer and which must stay fp32 in reduced precision) and the
newest one TensorRT 8.5 and 8.6 (JetPack 5.1 and 6.0) parse. torch's exporter writes opset 18
and converts down. What each TensorRT release imports is export/portable.py's concern.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..errors import CvtDeployError, require
from ..util import BatchRange, atomic_output, decode_metadata, encode_metadata, ort_session, scratch_dir

if TYPE_CHECKING:
    from ..model import CvT

DEFAULT_OPSET = 17
MIN_OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights; protobuf files cap at 2 GB


def fold_batchnorm(model: CvT) -> CvT:
    """A copy with every BatchNorm of the convolutional projections folded into its conv."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from ..model import ConvProjection

    folded = copy.deepcopy(model).eval()
    for mod in folded.modules():
        if isinstance(mod, ConvProjection) and isinstance(mod.bn, torch.nn.BatchNorm2d):
            mod.conv = fuse_conv_bn_eval(mod.conv, mod.bn)
            mod.bn = torch.nn.Identity()  # type: ignore[assignment]
    return folded


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """torch's exporter logs and prints a lot that is noise to a user; keep it for errors."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _reraise_interrupt(exc: BaseException) -> None:
    """Ctrl-C or SIGTERM during the export, which torch.onnx wraps in its own error: stop as
    interrupted (exit 128+signal, temporary files removed), not as an exporter failure."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def export_onnx(model: CvT, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
                batch: BatchRange = BatchRange(), metadata: dict[str, str] | None = None) -> Path:
    """Export ``model`` (fp32, BatchNorm folded, plain MatMul attention) to ``path`` atomically.

    The batch dimension is dynamic over ``batch`` (or fixed when min == max). The result is
    verified in ONNX Runtime at several batch sizes, because torch's exporter can silently
    specialise the batch to the example input's.
    """
    require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnx", "ONNX export")
    import onnx
    import torch

    check_opset(opset)
    path = Path(path)
    cfg = model.cfg
    net = fold_batchnorm(model).float()
    # An example batch of 1 lets the exporter specialise the batch dimension to 1.
    example_n = batch.min if not batch.dynamic else max(2, batch.min)
    example = torch.randn(example_n, cfg.in_chans, cfg.img_size, cfg.img_size)
    dynamic = {"x": {0: torch.export.Dim("batch", min=batch.min, max=batch.max)}} if batch.dynamic else None
    with _quiet_exporter() as log:
        try:
            program = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=dynamic, verbose=False)
        except Exception as e:  # the exporter raises many internal types; all mean "export failed"
            _reraise_interrupt(e)
            raise CvtDeployError(f"torch.onnx.export failed for {cfg.variant}: {type(e).__name__}: {str(e)[:500]}\n{log.getvalue()[-2000:]}",
                                 "report this with the message above; try another --opset") from None
    assert program is not None
    proto = program.model_proto
    set_metadata_props(proto, metadata or {})
    weight_bytes = sum(p.numel() * 4 for p in net.parameters())
    # Written and verified in a scratch folder beside ``path``; only a graph that runs at
    # every batch size of the range is moved into place (external data first, graph last).
    with scratch_dir(path.parent, "export") as scratch:
        candidate = scratch / path.name
        data_name = path.name + ".data"
        save_graph(proto, candidate, external=weight_bytes > EXTERNAL_DATA_THRESHOLD)
        check_batches(candidate, cfg.in_chans, cfg.img_size, batch)
        if (scratch / data_name).exists():
            os.replace(scratch / data_name, path.parent / data_name)
        os.replace(candidate, path)
    return path


def max_opset() -> int | None:
    """The newest opset both torch's exporter and the installed onnx can write (None: unknown here)."""
    try:
        import onnx
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:
        return None
    return min(int(ONNX_MAX_OPSET), int(onnx.defs.onnx_opset_version()))


def check_opset(opset: Any) -> int:
    """``opset`` if this exporter can write it; else an error with the valid range."""
    top = max_opset()
    valid = f"{MIN_OPSET}..{top}" if top else f">= {MIN_OPSET}"
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET or (top and opset > top):
        why = ("too old: LayerNormalization is a single node only from opset 17" if isinstance(opset, int)
               and not isinstance(opset, bool) and opset < MIN_OPSET else "not one this exporter can write")
        raise CvtDeployError(f"--opset {opset!r} is {why} (valid: {valid})",
                             f"use --opset {DEFAULT_OPSET} (TensorRT 8.5+ parses it) or another in {valid}")
    return opset


def graph_opset(path: str | os.PathLike[str]) -> int:
    """The default-domain opset a graph file declares (what was written, not what was asked)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def save_graph(model: Any, path: Path, external: bool | None = None) -> None:
    """Save a ModelProto; weights go to ``<name>.data`` beside it when the graph would pass
    protobuf's 2 GB cap (``external`` None: decided by the proto's size)."""
    import onnx

    if external is None:
        external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def check_batches(path: Path, chans: int, size: int, batch: BatchRange) -> None:
    """Run the graph at the range's edges and a few sizes inside; fail if any is rejected."""
    sizes = sorted({batch.min, batch.max, *(n for n in (1, 3, 8) if batch.min <= n <= batch.max)})
    trial_run(path, "exported", (chans, size, size), [n for n in sizes if n <= 16] or [batch.min],
              "the exporter fixed a dimension it should have left dynamic: report this; meanwhile export a "
              "fixed batch with --batch-range N")


def trial_run(path: Path, what: str, chw: tuple[int, ...], sizes: Sequence[int], hint: str) -> None:
    """Run a graph in ONNX Runtime CPU at each batch size in ``sizes`` (random input of its
    input's dtype): it must take the batch and return one finite row per image."""
    try:
        sess = ort_session(path)
    except Exception as e:
        raise CvtDeployError(f"ONNX Runtime cannot load the {what} graph {path.name}: {str(e)[:300]}", hint) from None
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    for n in sizes:
        x = np.random.default_rng(n).standard_normal((n, *chw)).astype(dtype)
        try:
            out = sess.run(None, {inp.name: x})[0]
        except Exception as e:
            raise CvtDeployError(f"the {what} graph {path.name} rejects batch {n} ({str(e)[:300]})", hint) from None
        if out.shape[0] != n or not np.isfinite(out).all():
            got = "non-finite values" if out.shape[0] == n else f"{out.shape[0]} rows"
            raise CvtDeployError(f"the {what} graph {path.name} returned {got} for a batch of {n}", hint)


def simplify(path: str | os.PathLike[str], *, atol: float = 1e-5) -> dict[str, Any]:
    """Simplify the graph in place with onnxsim, keeping it only if outputs still match.

    Returns what happened: ``{"simplified": bool, "nodes_before", "nodes_after", "reason"}``.
    Graphs onnxsim cannot handle (or larger than protobuf's 2 GB) are left as they are.
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    before = len(model.graph.node)
    result: dict[str, Any] = {"simplified": False, "nodes_before": before, "nodes_after": before}
    if (path.parent / (path.name + ".data")).exists():
        result["reason"] = "external-data graph (over 2 GB with weights); onnxsim works in memory only"
        return result
    try:
        import onnxsim
    except ImportError:
        result["reason"] = "onnxsim is not installed (pip install 'cvt-deploy[onnx]')"
        return result
    model = onnx.load(str(path))
    try:
        with _quiet_exporter():
            simplified, _ = onnxsim.simplify(model, check_n=0)
    except Exception as e:  # onnxsim surfaces C++ errors as assorted exception types
        result["reason"] = f"onnxsim failed: {type(e).__name__}: {str(e)[:200]}"
        return result
    shape = model.graph.input[0].type.tensor_type.shape.dim
    n = shape[0].dim_value or 2
    x = np.random.default_rng(0).standard_normal((n, *(d.dim_value for d in shape[1:]))).astype(np.float32)
    with scratch_dir(path.parent, "simplify") as scratch:
        candidate = scratch / path.name
        onnx.save_model(simplified, str(candidate))
        err = float(np.abs(ort_session(path).run(None, {INPUT_NAME: x})[0]
                           - ort_session(candidate).run(None, {INPUT_NAME: x})[0]).max())
        if err > atol:
            result["reason"] = f"onnxsim changed the outputs (max abs diff {err:.2e} > {atol:g}); kept the original"
            return result
        after = len(simplified.graph.node)
        if after >= before:
            result["reason"] = f"onnxsim gave no smaller graph ({before} -> {after} nodes); kept the original"
            return result
        os.replace(candidate, path)  # same folder, so the swap is atomic
    result.update(simplified=True, nodes_after=len(simplified.graph.node))
    return result


def graph_metadata(cfg_json: str, precision: str, extra: dict[str, Any]) -> dict[str, str]:
    """What the graph says about itself in ``metadata_props`` (all values are strings)."""
    return encode_metadata({"config": cfg_json, "precision": precision, **extra})


def set_metadata_props(model: Any, meta: dict[str, str]) -> None:
    """Set ``metadata_props`` on a ModelProto, replacing entries with the same keys."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    for key, value in keep + list(meta.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def stamp_metadata(path: str | os.PathLike[str], meta: dict[str, str]) -> None:
    """Set ``metadata_props`` on an existing graph file (atomically), replacing keys we own."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    set_metadata_props(model, meta)
    with atomic_output(path) as tmp:
        onnx.save_model(model, str(tmp))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``cvt_deploy.*`` metadata_props of a graph, without loading its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        if not model.graph.node:  # protobuf parses an empty file as an empty model
            raise ValueError("it holds no graph")
    except Exception as e:
        raise CvtDeployError(f"{path} is not a readable ONNX file (truncated or corrupt?): {str(e)[:200]}",
                             "re-export it with cvt-export") from None
    return decode_metadata({p.key: p.value for p in model.metadata_props})

