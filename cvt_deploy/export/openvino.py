"""OpenVINO IR: ``convert_openvino`` (one ONNX graph in, one IR out) and ``write_openvino_irs``
(the stage of ``cvt-export --format openvino`` that adds them to a bundle).

An IR is the graph OpenVINO's ONNX frontend makes of a bundle's portable graph, written as
``.xml`` (the graph, with the ONNX metadata_props kept in its rt_info) and ``.bin`` (the
weights). It is the same network the OpenVINO backend runs from the ONNX file, so it is no
faster once compiled; it is what OpenVINO tooling and apps expect (``core.read_model``), it
loads without the ONNX frontend, and an app that has only ``openvino`` can run it.

Precision is the graph's: weights are never compressed to fp16 (what ``openvino.save_model``
does by default, which would move an fp32 IR off the fp32 gates), and the int8 IR is our own
Q/DQ graph, which OpenVINO runs as int8, with its weights requantized to 7 bits (|w| <= 64,
``export.int8.narrow_weights``; activations as calibrated): on x86 CPUs without VNNI
OpenVINO's int8 kernels sum pairs of 8-bit products in 16 bits, which 8-bit weights overflow
(cvt_deploy/cpu.py), and an IR is checked on one CPU and deployed on others. Measured on the
demo model (360 held-out images, logit cosine to fp32 min / mean): 7-bit weights 0.9977 /
0.999958, the same logits on every instruction set; 8-bit 0.9983 / 0.999973 with VNNI and 0.71
without. NNCF is not used: on the 2-core AVX2 machine where this was measured first, NNCF's
int8 lost top-1 agreement that our calibration keeps (39% vs 87.5% on flat random logits), and
nothing here installs it. (That machine has no VNNI, and NNCF's default overflow fix covers the
first layer only: the figure may say more about the overflow than about NNCF.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..artifacts import PRECISIONS, REFERENCE, artifact_file
from ..cpu import SAFE_INT8_WEIGHT
from ..errors import CvtDeployError, require
from ..progress import stage
from ..util import current_umask, file_sha256, scratch_dir

if TYPE_CHECKING:
    from ..bundle import Artifact, Bundle

FILES = {p: artifact_file("openvino", p) for p in PRECISIONS}


def _message(e: BaseException) -> str:
    """The sentence in an OpenVINO error, without its source-file locations and check expressions."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    said = [ln for ln in lines if ln and not ln.startswith(("Exception from ", "Check '", "FrontEnd API failed"))]
    return " ".join(said or lines[:1])[:300] or type(e).__name__


def read_onnx(path: str | os.PathLike[str]) -> Any:
    """An ONNX file as an OpenVINO model, or a clear error."""
    from openvino.frontend import FrontEndManager

    try:
        # The ONNX frontend itself, not Core.read_model: that one tries every other frontend
        # (TensorFlow, PaddlePaddle ...) on a file ONNX cannot parse, and they print to stderr.
        frontend = FrontEndManager().load_by_framework("onnx")
        return frontend.convert(frontend.load(str(path)))
    except Exception as e:  # OpenVINO raises GeneralFailure, RuntimeError ...
        raise CvtDeployError(f"OpenVINO cannot read {path}: {_message(e)}",
                             "the file is truncated or corrupt, or not an ONNX model: re-export it with cvt-export") from None


def weights_file(xml: str) -> str:
    """The ``.bin`` that goes with an IR's ``.xml``."""
    return xml[: -len(".xml")] + ".bin" if xml.endswith(".xml") else xml + ".bin"


def convert_openvino(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write the OpenVINO IR of the ONNX graph ``src`` to ``dst`` (``.xml``) and its ``.bin``
    beside it, each atomically; returns what the manifest records about the conversion.
    An int8 (Q/DQ) graph's weights are written with 7 bits (module docstring)."""
    require("openvino", "openvino", "Writing OpenVINO IR")
    import openvino as ov


    dst = Path(dst)
    if dst.suffix != ".xml":
        raise CvtDeployError(f"an OpenVINO IR is written as NAME.xml, not {dst.name}", "name the file NAME.xml")
    bin_path = dst.with_name(weights_file(dst.name))
    info: dict[str, Any] = {"openvino": ov.get_version().split("-")[0], "from": Path(src).name}
    # OpenVINO insists on a name ending .xml, so the pair is written in a private folder beside
    # dst and renamed out of it: the .bin first, so a reader that finds the .xml finds its weights.
    with scratch_dir(dst.parent, dst.name) as tmp:
        narrowed = _narrowed_int8(Path(src), tmp / "narrowed.onnx")
        if narrowed:
            info.update(int8_weight_max=SAFE_INT8_WEIGHT, weights_narrowed=narrowed)
        model = read_onnx(tmp / "narrowed.onnx" if narrowed else src)
        try:
            ov.serialize(model, str(tmp / dst.name), str(tmp / bin_path.name))
        except Exception as e:  # OpenVINO raises its own types
            raise CvtDeployError(f"OpenVINO could not write the IR of {src}: {_message(e)}",
                                 "check the free space in the output folder; report the graph if that is not it") from None
        for path in (bin_path, dst):
            os.chmod(tmp / path.name, 0o666 & ~current_umask())
            os.replace(tmp / path.name, path)
    return info


def _narrowed_int8(src: Path, dst: Path) -> int:
    """Write ``src`` with its int8 weights narrowed to 7 bits to ``dst`` and return how many
    weights changed; 0 (nothing written) for a graph without int8 weights."""
    require("onnx", "onnx", "Writing the OpenVINO IR of an int8 graph")
    from .int8 import narrow_weights
    from .onnx import save_graph
    from .precision import _load

    model = _load(src)
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return 0
    narrowed = narrow_weights(model, SAFE_INT8_WEIGHT)
    if narrowed:
        save_graph(model, dst)
    return narrowed


def write_openvino_irs(bundle: Bundle, precisions: Sequence[str], progress: bool = True) -> list[Artifact]:
    """Add an IR of each portable graph of ``precisions`` the bundle holds (fp32 always) and
    return their artifacts; checked by the caller (parity on the openvino backend)."""
    from ..bundle import Artifact, artifact_name

    # decision: an IR is the portable graph converted; the reference's IR always
    sources = {p: bundle.find("onnx", p) for p in FILES if p in {REFERENCE, *precisions}}
    for precision, src in sources.items():  # all refused before any IR is written
        if src is None:
            raise CvtDeployError(f"bundle {bundle.root} has no {precision} ONNX graph to convert to OpenVINO IR",
                                 f"export it with: cvt-export --precision {precision} --out {bundle.root}")
    arts = []
    for precision, src in sources.items():
        assert src is not None
        name = FILES[precision]
        weights = weights_file(name)
        bundle.new_file(weights)  # written beside the .xml by convert_openvino
        with stage(f"writing the OpenVINO IR of {src.file} ({name} + {weights})", progress):
            info = convert_openvino(bundle.verified_path(src), bundle.new_file(name))
        arts.append(bundle.add(Artifact(artifact_name("openvino", precision), name, "openvino", precision,
                                        info={**info, "portable": src.name, "weights_file": weights,
                                              "weights_sha256": file_sha256(bundle.new_file(weights)),
                                              # converted from that graph: it keeps the same layers float
                                              **{k: v for k, v in src.info.items() if k == "int8_plan"}})))
    if progress:
        print(f"  OpenVINO IR: {', '.join(a.file for a in arts)} (runs with: cvt-predict --backend openvino)",
              file=sys.stderr)
    return arts
