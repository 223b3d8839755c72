"""``make_portable``: the fp32 graph rewritten so that every targeted TensorRT parser imports it.

The graphs torch's exporter writes are valid ONNX, but two of their constructs are not what
every Jetson's TensorRT reads (sources in :mod:`cvt_deploy.trt.readiness`):

* ``Shape`` with the opset-15 ``start``/``end`` attributes (torch writes one for the class
  token's batch size). The 8.5 and 8.6 importers ignore them and return the whole shape, so
  the class-token Expand becomes rank 6 and the next Concat fails. Every such Shape becomes
  a plain ``Shape`` + ``Slice`` on axis 0, which every release reads the same way.
* ``LayerNormalization`` (opset 17) has no importer in 8.5 (JetPack 5.1). For a graph meant
  for 8.5 it is written out as ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add, the form
  opset-16 exporters wrote. Those nodes are named in the manifest (``fp32_nodes``) so the fp16
  stage and TensorRT 8.5's fp16 build keep exactly them in fp32: they are the ones that
  overflow in fp16 (the squares in the variance).

A third is one ONNX allows and torch does not write today: a Conv without ``kernel_shape`` (ONNX
infers it from the weight). onnx-tensorrt's Conv importer for weights that come through a
DequantizeLinear (the int8 graphs, derived from this one) reads the kernel size from that
attribute alone, in every release up to 10.3 (``notes`` of ``trt/parser_ops.json``), so every
Conv gets it written out, whatever exported the graph.

``flatten_weight_matmuls`` (used by the int8 stage) writes the token MatMuls as 2-D GEMMs:
TensorRT 8.x accepts per-channel weight scales on a MatMul only when both inputs are 2-D.
All of them are model in, model out (ModelProto, changed in place), and add no shape
arithmetic: every reshape they write takes constant shapes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

# The releases a bundle's portable graphs can be written for, and their forms, are the registry's
# (artifacts.RELEASE): the oldest one chosen sets the graph's form. Re-exported for the callers here.
from ..artifacts import DEFAULT_TENSORRT, RELEASE, TENSORRT_TARGETS, check_tensorrt_target, targets_from  # noqa: F401
from ..errors import CvtDeployError, require


class _Graph:
    """Unique names and constants for the nodes a rewrite adds."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.names = {n.name for n in model.graph.node} | {i.name for i in model.graph.initializer}
        self.names |= {o for n in model.graph.node for o in (*n.input, *n.output)}

    def name(self, base: str) -> str:
        out, k = base, 1
        while out in self.names:
            out, k = f"{base}_{k}", k + 1
        self.names.add(out)
        return out

    def const(self, base: str, values: Any, dtype: Any = np.int64) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name


def split_shape_ranges(model: Any) -> int:
    """Replace each ``Shape(start, end)`` by ``Shape`` + ``Slice``; returns how many."""
    from onnx import helper

    g, done = _Graph(model), 0
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or not ({"start", "end"} & attrs.keys()):
            model.graph.node.append(node)
            continue
        whole = g.name(f"{node.output[0]}_whole")
        base = node.name or node.output[0]
        model.graph.node.append(helper.make_node("Shape", [node.input[0]], [whole], name=g.name(base)))
        end = attrs.get("end", np.iinfo(np.int64).max)
        inputs = [whole, g.const(f"{base}_start", [attrs.get("start", 0)]), g.const(f"{base}_end", [end]),
                  g.const(f"{base}_axes", [0])]
        model.graph.node.append(helper.make_node("Slice", inputs, list(node.output), name=g.name(f"{base}_slice")))
        done += 1
    return done


def write_kernel_shapes(model: Any) -> int:
    """Give every Conv without ``kernel_shape`` the one its weight implies; returns how many."""
    from onnx import helper

    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    done = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2 \
                or any(a.name == "kernel_shape" for a in node.attribute):
            continue
        weight = node.input[1]
        # int8 and fp16 weights sit behind a DequantizeLinear or a Cast of the initializer
        while weight not in dims and weight in producer and producer[weight].op_type in ("DequantizeLinear", "Cast"):
            weight = producer[weight].input[0]
        if len(dims.get(weight, [])) < 3:
            continue  # weights computed at run time: the readiness check refuses the node, naming it
        node.attribute.append(helper.make_attribute("kernel_shape", dims[weight][2:]))
        done += 1
    return done


def decompose_layernorm(model: Any) -> list[str]:
    """Write every LayerNormalization as the elementwise ops 8.5 imports; returns their node names."""
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    g, kept = _Graph(model), []
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            model.graph.node.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1 or len([o for o in node.output if o]) != 1:
            raise CvtDeployError(f"LayerNormalization {node.name!r} normalises axis {attrs.get('axis')} or returns its "
                                 "statistics; only the last-axis form CvT uses can be decomposed for TensorRT 8.5",
                                 "export for TensorRT 8.6 or newer (--tensorrt 8.6)")
        eps = float(attrs.get("epsilon", 1e-5))
        base = node.name or node.output[0]
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        # ReduceMean takes its axes as an attribute up to opset 17 and as an input from 18.
        axes_input = [g.const(f"{base}/axes", [-1])] if opset >= 18 else []
        axes_attr = {} if opset >= 18 else {"axes": [-1]}
        steps: list[tuple[str, list[str], dict[str, Any]]] = [
            ("ReduceMean", [x, *axes_input], {**axes_attr, "keepdims": 1}),
            ("Sub", [x, "@0"], {}),
            ("Mul", ["@1", "@1"], {}),
            ("ReduceMean", ["@2", *axes_input], {**axes_attr, "keepdims": 1}),
            ("Add", ["@3", g.const(f"{base}/epsilon", [eps], np.float32)], {}),
            ("Sqrt", ["@4"], {}),
            ("Div", ["@1", "@5"], {}),
            ("Mul", ["@6", scale], {}),
        ]
        if bias is not None:
            steps.append(("Add", ["@7", bias], {}))
        outs: list[str] = []
        for k, (op, ins, kw) in enumerate(steps):
            last = k == len(steps) - 1
            out = node.output[0] if last else g.name(f"{base}/{op}_{k}_out")
            name = g.name(f"{base}/{op}_{k}")
            model.graph.node.append(helper.make_node(op, [outs[int(i[1:])] if i.startswith("@") else i for i in ins],
                                                     [out], name=name, **kw))
            outs.append(out)
            kept.append(name)
    return kept


def flatten_weight_matmuls(model: Any) -> int:
    """Rewrite ``MatMul(x[B, N, K], W[K, M]) (+ bias)`` as ``Reshape(x, [-1, K]) @ W (+ bias)`` then
    ``Reshape([-1, N, M])``; returns how many. Needs static N and K (the batch may be dynamic)."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input)}
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    g, done = _Graph(model), 0
    nodes = list(model.graph.node)
    del model.graph.node[:]
    moved: dict[int, Any] = {}  # bias Adds that now sit inside the 2-D region
    for node in nodes:
        if id(node) in moved:
            continue
        shape = shapes.get(node.input[0]) if node.op_type == "MatMul" and node.input else None
        w = weights.get(node.input[1]) if shape is not None and len(node.input) > 1 else None
        if shape is None or w is None or len(w) != 2 or len(shape) != 3 or None in shape[1:]:
            model.graph.node.append(node)
            continue
        _, tokens, k = shape
        m = w[1]
        base = node.name or node.output[0]
        flat = g.name(f"{base}_2d_in")
        model.graph.node.append(helper.make_node("Reshape", [node.input[0], g.const(f"{base}_2d_shape", [-1, k])],
                                                 [flat], name=g.name(f"{base}_2d_reshape")))
        out2d = g.name(f"{base}_2d_out")
        model.graph.node.append(helper.make_node("MatMul", [flat, node.input[1]], [out2d], name=base))
        last, final = out2d, node.output[0]
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in {o.name for o in model.graph.output}:
            add = users[0]
            other = [i for i in add.input if i != node.output[0]]
            if len(other) == 1 and weights.get(other[0]) in ((m,), (1, m)):
                # the bias joins the 2-D GEMM, so TensorRT can fuse it into the kernel's epilogue
                last = g.name(f"{base}_2d_bias")
                model.graph.node.append(helper.make_node("Add", [out2d, other[0]], [last], name=add.name))
                final = add.output[0]
                moved[id(add)] = add
        model.graph.node.append(helper.make_node("Reshape", [last, g.const(f"{base}_3d_shape", [-1, tokens, m])],
                                                 [final], name=g.name(f"{base}_3d_reshape")))
        done += 1
    return done


def make_portable(model: Any, tensorrt: str = DEFAULT_TENSORRT) -> dict[str, Any]:
    """Rewrite ``model`` (fp32, in place) for TensorRT ``tensorrt`` and newer; returns the manifest facts."""
    require("onnx", "onnx", "portable graphs")
    tensorrt = check_tensorrt_target(tensorrt)
    shapes = split_shape_ranges(model)
    kernels = write_kernel_shapes(model)
    decomposed = RELEASE[tensorrt].layernorm == "decomposed"
    fp32_nodes = decompose_layernorm(model) if decomposed else []
    return {"tensorrt": targets_from(tensorrt), "shape_slices": shapes, "kernel_shapes": kernels,
            "layernorm": "decomposed" if decomposed else "LayerNormalization",
            **({"fp32_nodes": fp32_nodes} if fp32_nodes else {})}


def portable_graph(path: str | os.PathLike[str], tensorrt: str = DEFAULT_TENSORRT) -> dict[str, Any]:
    """:func:`make_portable` on the fp32 graph file at ``path``, rewritten atomically after
    onnx.checker and an ONNX Runtime run; returns the manifest facts."""
    import onnx

    from ..util import atomic_output
    from .onnx import save_graph
    from .precision import _input_dims, _verify

    path = Path(path)
    model = onnx.load(str(path))
    info = make_portable(model, tensorrt)
    if info["shape_slices"] or info["kernel_shapes"] or info.get("fp32_nodes"):
        fixed_batch, chw = _input_dims(model)
        with atomic_output(path) as tmp:
            save_graph(model, tmp)
            _verify(tmp, "portable fp32", chw, fixed_batch)
    return info
