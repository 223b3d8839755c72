"""``embed_io``: a graph that takes camera pixels and (optionally) gives probabilities.

Edge apps (a C++ loop, DeepStream's nvinfer) hand the network pixels; a graph that expects
ImageNet-normalised float32 NCHW makes each of them re-implement our normalisation, and
nvinfer cannot (one scalar scale, no per-channel std). ``embed_io`` puts it in the graph:

    pixels (uint8 NHWC | uint8 NCHW | float32 0..255 NCHW, RGB, at the model's input size)
      -> Cast(float) -> Transpose(NHWC->NCHW) -> Div(255) -> Sub(mean) -> Div(std) -> the network
      [-> Softmax]   (``output="probs"``)

The steps are explicit nodes in front of the first convolution, not folded into its
weights: folding would change what the convolution's zero padding stands for at the
borders (zero in normalised space is the mean colour, not black). Div rather than Mul by a
reciprocal, so the graph computes exactly what preprocess.normalize computes in numpy.

Applied to each finished graph (fp32, typed fp16, Q/DQ int8): all three take and give
float32 at their edges, so the added nodes run in fp32 in every one, the fp16 graph stays
correctly typed and the int8 graph's QuantizeLinear still quantizes the normalised input.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import PreprocessConfig
from ..progress import stage
from ..errors import CvtDeployError, require
from ..preprocess import graph_dims
from ..util import INPUT_FORMAT_KEY, INPUT_FORMATS, OUTPUT_KINDS, atomic_output, check_choice, encode_metadata, ort_session
from .onnx import save_graph, set_metadata_props

if TYPE_CHECKING:
    from ..bundle import Bundle

PROBS_NAME = "probs"


def embed_bundle_io(bundle: Bundle, input_format: str, output: str, progress: bool = True) -> None:
    """:func:`embed_io` on every ONNX graph of ``bundle``, recorded in its manifest. The export's
    last graph stage: the precision stages all start from the float fp32 graph."""
    from ..bundle_write import changing

    with stage(f"making the graphs take {input_format} input and give {output}", progress), changing(bundle):
        for art in [a for a in bundle.artifacts.values() if a.kind == "onnx"]:  # decision: every graph takes the same input
            src, dst = bundle.path(art), bundle.new_file(art.file)
            if dst != src:  # changing a bundle in place: the rewrite is staged, the original kept until it lands
                shutil.copyfile(src, dst)
            art.info.update(embed_io(dst, bundle.config.preprocess, input_format, output))
            bundle.add(art)


def embed_io(path: str | os.PathLike[str], cfg: PreprocessConfig, input_format: str = "uint8-nhwc",
             output: str = "logits") -> dict[str, Any]:
    """Rewrite the float-input graph at ``path`` in place (atomically) to take ``input_format``
    and give ``output``; check it with onnx's checker, shape inference and ONNX Runtime.

    Returns the facts for the bundle manifest: ``input_format``, ``output_kind``, and the
    graph's ``input``/``output`` tensor names.
    """
    require("onnx", "onnx", "raw-pixel graphs")
    import onnx

    check_choice(input_format, INPUT_FORMATS, "input format")
    check_choice(output, OUTPUT_KINDS, "output kind")
    path = Path(path)
    model = _float_graph(path)
    graph = model.graph
    image, logits = graph.input[0], graph.output[0]
    in_name, out_name = image.name, logits.name
    batch_dim = image.type.tensor_type.shape.dim[0]
    batch: Any = batch_dim.dim_param or batch_dim.dim_value or "batch"

    nodes = _take_pixels(graph, cfg, input_format, batch) if input_format != "float" else []
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)  # topological order: the new nodes feed the network
    if output == "probs":
        out_name = _give_probs(graph, batch)
    set_metadata_props(model, encode_metadata({"input_format": input_format, "output_kind": output}))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # checker and shape-inference errors come as assorted types
        raise CvtDeployError(f"the raw-pixel graph of {path.name} does not check: {str(e)[:300]}",
                             "report this; meanwhile export with --input-format float") from None
    with atomic_output(path) as tmp:
        save_graph(model, tmp, external=False)
        _trial(tmp, cfg, input_format, output)
    return {"input_format": input_format, "output_kind": output, "input": in_name, "output": out_name}


def _float_graph(path: Path) -> Any:
    """The graph at ``path``, refused unless it is an in-file classifier taking float32 images."""
    import onnx
    from onnx import TensorProto

    if (path.parent / (path.name + ".data")).exists():
        raise CvtDeployError(f"{path.name} keeps its weights in external data (over 2 GB); raw-pixel inputs are "
                             "added to in-file graphs only", "export with --input-format float for this model")
    model = onnx.load(str(path))
    graph = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(INPUT_FORMAT_KEY, "float") != "float":
        raise CvtDeployError(f"{path.name} already takes raw pixels", "embed into a float-input graph only")
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise CvtDeployError(f"{path.name} has {len(graph.input)} inputs and {len(graph.output)} outputs; a CvT "
                             "classifier graph has one of each", "re-export it with cvt-export")
    if graph.input[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise CvtDeployError(f"{path.name}'s input {graph.input[0].name!r} is not float32", "pass a graph cvt-export wrote")
    return model


def _take_pixels(graph: Any, cfg: PreprocessConfig, input_format: str, batch: Any) -> list[Any]:
    """Make the graph input ``input_format`` pixels (same name) and return the nodes that normalise
    them into the tensor the network now reads."""
    from onnx import TensorProto, helper, numpy_helper

    image = graph.input[0]
    in_name = image.name
    # The network now reads an internal tensor; the graph input keeps the name apps know.
    inner = in_name + "_normalized"
    for node in graph.node:
        node.input[:] = [inner if i == in_name else i for i in node.input]
    mean = np.asarray(cfg.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(cfg.std, np.float32).reshape(1, -1, 1, 1)
    graph.initializer.extend([numpy_helper.from_array(np.asarray(255.0, np.float32), "rawpixel_255"),
                              numpy_helper.from_array(mean, "rawpixel_mean"),
                              numpy_helper.from_array(std, "rawpixel_std")])
    nodes = []
    x = in_name
    if input_format.startswith("uint8"):
        nodes.append(helper.make_node("Cast", [x], ["rawpixel_float"], "rawpixel/cast", to=TensorProto.FLOAT))
        x = "rawpixel_float"
    if input_format == "uint8-nhwc":
        nodes.append(helper.make_node("Transpose", [x], ["rawpixel_nchw"], "rawpixel/to_nchw", perm=[0, 3, 1, 2]))
        x = "rawpixel_nchw"
    nodes += [helper.make_node("Div", [x, "rawpixel_255"], ["rawpixel_unit"], "rawpixel/scale"),
              helper.make_node("Sub", ["rawpixel_unit", "rawpixel_mean"], ["rawpixel_centered"], "rawpixel/mean"),
              helper.make_node("Div", ["rawpixel_centered", "rawpixel_std"], [inner], "rawpixel/std")]
    elem = TensorProto.UINT8 if input_format.startswith("uint8") else TensorProto.FLOAT
    graph.input.remove(image)
    graph.input.append(helper.make_tensor_value_info(in_name, elem, [batch, *graph_dims(cfg, input_format)]))
    return nodes


def _give_probs(graph: Any, batch: Any) -> str:
    """A Softmax after the logits, its output the graph's; returns its name."""
    from onnx import TensorProto, helper

    logits = graph.output[0]
    graph.node.append(helper.make_node("Softmax", [logits.name], [PROBS_NAME], "rawpixel/softmax", axis=-1))
    graph.output.remove(logits)
    graph.output.append(helper.make_tensor_value_info(PROBS_NAME, TensorProto.FLOAT, [batch, _class_dim(logits)]))
    return PROBS_NAME


def _class_dim(value_info: Any) -> Any:
    """The class dimension of the logits output (its number, or its symbolic name)."""
    dim = value_info.type.tensor_type.shape.dim[-1]
    return dim.dim_value or dim.dim_param or "classes"


def _trial(path: Path, cfg: PreprocessConfig, input_format: str, output: str) -> None:
    """ONNX Runtime must take pixels of the stated type and layout and give finite rows
    (probabilities summing to 1 for a probs graph)."""
    sess = ort_session(path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, *graph_dims(cfg, input_format)), dtype=np.uint8)
    x = pixels.astype(np.float32) if input_format in ("float", "float-pixels") else pixels
    if input_format == "float":
        x = (x / 255.0 - 0.5).astype(np.float32)
    try:
        out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    except Exception as e:
        raise CvtDeployError(f"ONNX Runtime rejects the raw-pixel graph {path.name}: {str(e)[:300]}",
                             "report this; meanwhile export with --input-format float") from None
    ok = out.shape[0] == 2 and np.isfinite(out).all()
    if ok and output == "probs":
        ok = bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-4))
    if not ok:
        raise CvtDeployError(f"the raw-pixel graph {path.name} gives {out.shape} outputs that are not finite "
                             f"{'probabilities' if output == 'probs' else 'logits'}", "report this")
