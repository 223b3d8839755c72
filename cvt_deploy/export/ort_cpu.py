"""Graphs for ONNX Runtime's CPU provider: ``rewrite_for_ort_cpu`` (model in, model out) and
``write_ort_cpu_graphs`` (the export stage that adds them to a bundle).

The portable graphs (``model.onnx``, ``model.fp16.onnx``, ``model.int8.onnx``) are what
TensorRT and the other execution providers compile; they use standard ONNX ops only and the
int8 one carries TensorRT's Q/DQ placement. On ONNX Runtime's CPU provider two things make
them slower than they need to be (measured on a 2-core AVX-512 VNNI CPU, ONNX Runtime 1.32,
CvT-13):

* attention runs as MatMul/Mul/Softmax/MatMul with Reshape/Transpose around it, and every
  token <-> feature-map change is a Transpose that ORT cannot fold into the NCHWc reorders
  of its convolutions (100 Transposes in CvT-13). ``rewrite_for_ort_cpu`` replaces each
  attention with one ``com.microsoft.MultiHeadAttention`` (q/k/v biases folded into its
  bias input) and writes each token <-> map change as Reshape to (B, H, W, C) + Transpose,
  which ORT's layout transformer folds away (13 Transposes left in CvT-13): 1.08x at batch 8.
* the Q/DQ int8 graph keeps every Conv in float behind Quantize/Dequantize pairs, which
  breaks the NCHWc layout: it was slower than fp32 on the demo model. The CPU int8 graph is
  instead dynamic quantization of the rewritten graph's weight MatMuls (per-channel s8
  weights, u8 activations quantized per call: ``MatMulIntegerToFloat``), Convs left float.
  Weights use 7 bits (``reduce_range``): CPUs without VNNI (AVX2, like the 2-core machine
  this was built on) multiply u8 x s8 with VPMADDUBSW, whose int16 pair sums saturate; on
  the demo model full-range weights gave min cosine 0.9967 and 99.72% top-1 agreement
  against fp32, 7-bit weights 0.9995 and 100%; CvT-13 ran at the same speed within this
  machine's noise (full-range / 7-bit: 0.95x at batch 1, 1.08x at batch 8). A bundle may be exported
  on one CPU and run on another, so the safe choice is the default.
  The activation scale is computed per call over the whole batch, so one image's logits
  move slightly with the other images of its batch (within the int8 gates).

A pattern that is not found means no ORT-CPU graph (with the reason), never a partly
rewritten or wrong one; each graph is also compared with the portable fp32 graph on
random input before it is kept, and passes the precision's parity gates at export.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..artifacts import TARGET as TARGETS_BY_NAME, artifact_file
from ..bundle import Artifact, artifact_name
from ..errors import CvtDeployError
from ..progress import stage
from ..util import ort_session
from .int8_plan import Int8Plan

MS_DOMAIN = "com.microsoft"
TARGET = "onnxruntime-cpu"  # the manifest's target of these graphs ("portable" for the others)
TARGET_INFO = TARGETS_BY_NAME[TARGET]
FILES = {p: artifact_file("onnx", p, TARGET) for p in TARGET_INFO.precisions}
# The rewrite must reproduce the portable fp32 graph to float rounding (seen: 4e-6 on CvT-13).
SELF_CHECK_ATOL = 1e-4


class PatternNotFound(CvtDeployError):
    """The graph does not have the shape the rewrite expects: no ORT-CPU graph is written."""

    def __init__(self, why: str) -> None:
        super().__init__(f"no ONNX Runtime CPU graph: {why}",
                         "the portable graphs are used on the CPU (they are correct, only slower); "
                         "report this with the fp32 graph if the model is a CvT")


class _Graph:
    """Producer/consumer indexes over an ONNX graph, and its constant initializers."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.g = model.graph
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.init = {i.name: i for i in self.g.initializer}
        self._np = numpy_helper
        self.taken = {*self.producer, *self.init, *(i.name for i in self.g.input)}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.init:
            return np.asarray(self._np.to_array(self.init[name]))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            from onnx import helper

            for a in node.attribute:
                if a.name == "value":
                    return np.asarray(self._np.to_array(helper.get_attribute_value(a)))
        return None

    def op(self, name: str, op_type: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def add_const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(self._np.from_array(array, name))
        return name


def _heads_of(gr: _Graph, name: str, perm: list[int]) -> tuple[str, int, int] | None:
    """``name`` = Transpose(perm) of Reshape(x, [b, n, heads, d]): (x, heads, d), else None."""
    tr = gr.op(name, "Transpose")
    if tr is None or list(gr.attr(tr, "perm", [])) != perm:
        return None
    rs = gr.op(tr.input[0], "Reshape")
    shape = gr.const(rs.input[1]) if rs is not None else None
    if rs is None or shape is None or shape.shape != (4,) or shape[2] <= 0 or shape[3] <= 0:
        return None
    return rs.input[0], int(shape[2]), int(shape[3])


def _split_bias(gr: _Graph, name: str, width: int) -> tuple[str, np.ndarray | None]:
    """``name`` = Add(MatMul out, bias[width]): (MatMul out, bias); else (name, None)."""
    add = gr.op(name, "Add")
    if add is not None:
        for this, other in ((0, 1), (1, 0)):
            bias = gr.const(add.input[other])
            if bias is not None and bias.shape == (width,) and bias.dtype == np.float32 \
                    and gr.op(add.input[this], "MatMul") is not None:
                return add.input[this], bias
    return name, None


def _attention(gr: _Graph, softmax: Any) -> tuple[list[Any], str] | None:
    """The MultiHeadAttention that replaces the attention around ``softmax`` (new nodes, the
    tensor it replaces), or None when the pattern differs anywhere."""
    from onnx import helper

    if gr.attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scaled = gr.producer.get(softmax.input[0])
    if scaled is None or scaled.op_type not in ("Mul", "Div"):
        return None
    scale, qk = None, None
    for this, other in ((0, 1), (1, 0)) if scaled.op_type == "Mul" else ((0, 1),):
        c = gr.const(scaled.input[other])
        qk = gr.op(scaled.input[this], "MatMul")
        if c is not None and c.size == 1 and qk is not None:
            scale = float(c.reshape(())) if scaled.op_type == "Mul" else 1.0 / float(c.reshape(()))
            break
    if scale is None or qk is None or not np.isfinite(scale):
        return None
    users = gr.consumers.get(softmax.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None
    pv = users[0]
    q, k, v = _heads_of(gr, qk.input[0], [0, 2, 1, 3]), _heads_of(gr, qk.input[1], [0, 2, 3, 1]), \
        _heads_of(gr, pv.input[1], [0, 2, 1, 3])
    if q is None or k is None or v is None or not q[1:] == k[1:] == v[1:]:
        return None
    heads, d = q[1], q[2]
    out_users = gr.consumers.get(pv.output[0], [])
    if len(out_users) != 1 or out_users[0].op_type != "Transpose" or list(gr.attr(out_users[0], "perm", [])) != [0, 2, 1, 3]:
        return None
    merge_users = gr.consumers.get(out_users[0].output[0], [])
    merge = merge_users[0] if len(merge_users) == 1 and merge_users[0].op_type == "Reshape" else None
    shape = gr.const(merge.input[1]) if merge is not None else None
    if merge is None or shape is None or shape.shape != (3,) or shape[2] != heads * d:
        return None
    (q_in, bq), (k_in, bk), (v_in, bv) = (_split_bias(gr, t[0], heads * d) for t in (q, k, v))
    inputs = [q_in, k_in, v_in]
    if bq is not None or bk is not None or bv is not None:
        zero = np.zeros(heads * d, np.float32)
        bias = np.concatenate([b if b is not None else zero for b in (bq, bk, bv)])
        inputs.append(gr.add_const(f"{softmax.name or 'attention'}.mha_bias", bias))
    node = helper.make_node("MultiHeadAttention", inputs, [merge.output[0]], name=gr.fresh(f"{softmax.name or 'attn'}_mha"),
                            domain=MS_DOMAIN, num_heads=heads, scale=scale)
    return [node], merge.output[0]


def _layout(gr: _Graph, shapes: dict[str, list[int]]) -> int:
    """Rewrite token <-> feature-map changes so the Transpose sits on the 4-D side. Returns how many.

    Each rewrite is an identity whatever the values: it is applied only where shape inference
    says the tensors are (b, h*w, c) tokens and (b, c, h, w) maps of the Reshape's sizes.
    """
    from onnx import helper

    count = 0
    for node in list(gr.g.node):
        if node.op_type != "Transpose" or list(gr.attr(node, "perm", [])) != [0, 2, 1]:
            continue
        dims = shapes.get(node.input[0])
        # tokens (b, n, c) -> Transpose -> Reshape (b, c, h, w)  ==>  Reshape (b, h, w, c) -> Transpose(0, 3, 1, 2)
        for user in list(gr.consumers.get(node.output[0], [])):
            shape = gr.const(user.input[1]) if user.op_type == "Reshape" else None
            if shape is None or shape.shape != (4,) or (shape[1:] <= 0).any() or dims is None or len(dims) != 3 \
                    or dims[2] != shape[1] or dims[1] != shape[2] * shape[3]:
                continue
            nhwc = gr.add_const("nhwc_shape", np.array([shape[0], shape[2], shape[3], shape[1]], np.int64))
            mid = gr.fresh(f"{user.output[0]}_nhwc")
            user.input[0], user.input[1], out = node.input[0], nhwc, user.output[0]
            user.output[0] = mid
            gr.g.node.append(helper.make_node("Transpose", [mid], [out], name=gr.fresh(f"{user.name}_to_nchw"), perm=[0, 3, 1, 2]))
            count += 1
        # map (b, c, h, w) -> Reshape (b, c, n) -> Transpose  ==>  Transpose(0, 2, 3, 1) -> Reshape (b, n, c)
        rs = gr.op(node.input[0], "Reshape")
        shape = gr.const(rs.input[1]) if rs is not None else None
        src = shapes.get(rs.input[0]) if rs is not None else None
        if rs is None or shape is None or shape.shape != (3,) or shape[1] <= 0 or shape[2] <= 0 or src is None \
                or len(src) != 4 or src[1] != shape[1] or src[2] <= 0 or src[3] <= 0 or src[2] * src[3] != shape[2]:
            continue
        mid = gr.fresh(f"{node.output[0]}_nhwc")
        tokens = gr.add_const("tokens_shape", np.array([shape[0], shape[2], shape[1]], np.int64))
        gr.g.node.append(helper.make_node("Transpose", [rs.input[0]], [mid], name=gr.fresh(f"{node.name}_to_nhwc"), perm=[0, 2, 3, 1]))
        gr.g.node.append(helper.make_node("Reshape", [mid, tokens], [node.output[0]], name=gr.fresh(f"{node.name}_tokens")))
        node.output[0] = gr.fresh(f"{node.output[0]}_dead")
        count += 1
    return count


def _infer_shapes(model: Any) -> dict[str, list[int]]:
    """Tensor name -> dims (-1 where unknown), by ONNX shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise PatternNotFound(f"ONNX shape inference failed on the fp32 graph ({str(e)[:200]})") from None
    shapes: dict[str, list[int]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return shapes


def _prune(g: Any) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(_toposort(g)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)


def _toposort(g: Any) -> list[Any]:
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, order = list(g.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise PatternNotFound("the rewritten graph has a cycle or a dangling input")
        pending = rest
    return order


def rewrite_for_ort_cpu(model: Any) -> tuple[Any, dict[str, int]]:
    """An fp32 CvT graph rewritten for ONNX Runtime's CPU provider (a new model; ``model`` is
    untouched), and counts of what changed. Raises :class:`PatternNotFound` unless every
    attention (every Softmax) matches the pattern."""
    import copy

    from onnx import helper

    out = copy.deepcopy(model)
    # The layout first: it needs shape inference, which cannot see through com.microsoft ops.
    layout = _layout(_Graph(out), _infer_shapes(out))
    gr = _Graph(out)
    softmaxes = [n for n in gr.g.node if n.op_type == "Softmax"]
    if not softmaxes:
        raise PatternNotFound("the graph has no Softmax, so no attention to rewrite")
    new_nodes = []
    for sm in softmaxes:
        found = _attention(gr, sm)
        if found is None:
            raise PatternNotFound(f"the attention around {sm.name or 'a Softmax'} is not q/k/v MatMul -> "
                                  "Reshape/Transpose to heads -> MatMul -> scale -> Softmax -> MatMul -> merge heads")
        nodes, replaced = found
        # the merge Reshape that produced ``replaced`` is now dead: give it a name nobody reads
        gr.producer[replaced].output[0] = gr.fresh(f"{replaced}_dead")
        new_nodes += nodes
    gr.g.node.extend(new_nodes)
    _prune(gr.g)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    ops: dict[str, int] = {}
    for n in out.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return out, {"attention": len(softmaxes), "layout": layout, "transposes": ops.get("Transpose", 0),
                 "transposes_before": sum(n.op_type == "Transpose" for n in model.graph.node)}


def quantize_dynamic_int8(src: Path, dst: Path, plan: Int8Plan | None = None) -> dict[str, Any]:
    """Dynamic int8 of ``src``'s weight MatMuls (per-channel s8 weights, u8 activations scaled per
    call); Convs, attention and everything else stay float, and so do the nodes of ``plan``
    (named as in the portable graphs: the rewrite keeps the names of the weighted nodes).
    Writes ``dst`` atomically."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..util import atomic_output
    from .precision import _quiet

    # ONNX Runtime writes a Gemm as a MatMul named <name>_MatMul (and an Add) before it quantizes.
    kept = [m for n in (plan.nodes if plan else ()) for m in (n, f"{n}_MatMul")]
    with atomic_output(dst) as tmp, _quiet():
        quantize_dynamic(str(src), str(tmp), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=kept)
    return {"quantization": "dynamic", "weights": "int8 per output channel, symmetric",
            "activations": "uint8, range computed per call", "quantized_ops": ["MatMul"],
            **(plan.recorded() if plan else {})}


def _self_check(reference: Path, candidate: Path, chw: tuple[int, ...], batches: Sequence[int], atol: float) -> float:
    """Largest |logit difference| of ``candidate`` against ``reference`` on random input; raises above ``atol``."""
    worst = 0.0
    try:  # e.g. an onnxruntime without a CPU MultiHeadAttention kernel: no CPU graph, not a failed export
        ref, cand = ort_session(reference), ort_session(candidate)
        name = ref.get_inputs()[0].name
        for b in batches:
            x = np.random.default_rng(b).standard_normal((b, *chw)).astype(np.float32)
            diff = float(np.abs(ref.run(None, {name: x})[0] - cand.run(None, {cand.get_inputs()[0].name: x})[0]).max())
            worst = max(worst, diff)
    except Exception as e:
        raise PatternNotFound(f"ONNX Runtime cannot run the rewritten graph ({str(e).splitlines()[0][:200]})") from None
    if not worst <= atol:
        raise PatternNotFound(f"the rewritten graph differs from the portable one by {worst:.3g} (> {atol:g})")
    return worst


def write_ort_cpu_graphs(bundle: Any, precisions: Sequence[str], metadata: dict[str, dict[str, str]],
                         progress: bool = True, plan: Int8Plan | None = None) -> list[Any]:
    """Add the ORT-CPU fp32 graph (always, when the rewrite applies) and its int8 graph (when int8
    was asked for; ``plan``: the nodes it keeps float) to ``bundle``; returns their artifacts. When
    the rewrite does not apply, says why on stderr and adds nothing: the portable graphs serve the
    CPU then."""
    import onnx

    from .onnx import INPUT_NAME, OUTPUT_NAME, save_graph, set_metadata_props, trial_run
    from .precision import _input_dims

    # The target's graphs (artifacts.TARGET): the float rewrite, and its dynamic quantization.
    floats, ints = TARGET_INFO.precisions
    src = bundle.path(bundle.require("onnx", floats))  # decision: the portable graph it rewrites, by definition
    arts = []
    try:
        with stage("rewriting for ONNX Runtime CPU (MultiHeadAttention, NHWC token maps)", progress):
            model = onnx.load(str(src))
            fixed, chw = _input_dims(model)
            rewritten, counts = rewrite_for_ort_cpu(model)
            set_metadata_props(rewritten, metadata[floats])
            dst = bundle.new_file(FILES[floats])
            save_graph(rewritten, dst)
            sizes = [fixed] if fixed else [1, 3, 8]
            diff = _self_check(src, dst, chw, sizes, SELF_CHECK_ATOL)
        base = {"target": TARGET, "input": INPUT_NAME, "output": OUTPUT_NAME}
        arts.append(bundle.add(Artifact(artifact_name("onnx", floats, TARGET), dst.name, "onnx", floats,
                                        info={**base, "portable": artifact_name("onnx", floats), "rewrite": counts,
                                              "self_check_max_abs": diff})))
        if ints in precisions:
            with stage(f"quantizing the ONNX Runtime CPU graph to {ints} (dynamic, per-channel weights)", progress):
                dst8 = bundle.new_file(FILES[ints])
                info = quantize_dynamic_int8(dst, dst8, plan)
                q = onnx.load(str(dst8))
                set_metadata_props(q, metadata[ints])
                save_graph(q, dst8)
                trial_run(dst8, f"ONNX Runtime CPU {ints}", chw, sizes, "report this with the fp32 graph that caused it")
            arts.append(bundle.add(Artifact(artifact_name("onnx", ints, TARGET), dst8.name, "onnx", ints,
                                            info={**base, "portable": artifact_name("onnx", ints), **info})))
    except PatternNotFound as e:
        for art in arts:
            bundle.artifacts.pop(art.name, None)
        for name in FILES.values():
            bundle.new_file(name).unlink(missing_ok=True)
        if progress:
            print(f"  note: {e.message}; {e.hint}", file=sys.stderr)
        return []
    return arts
