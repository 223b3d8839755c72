"""TensorRT-RTX: NVIDIA's real ONNX parser and builder on every TensorRT-bound graph, on this CPU.

These tests parse and build for real (TensorRT-RTX's ahead-of-time build needs no GPU), through
the project's own build code (trt/builder.py), which `--format trt` runs on a GPU with
TensorRT. Where tensorrt-rtx is not installed they skip with the reason (CI installs it: the
'dev' extra includes 'rtx'). Nothing here imitates TensorRT. Running an engine needs a GPU:
the runtime's refusal is tested here, its run only where a GPU exists.
"""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cvt_deploy.bundle_write import changing  # noqa: E402
from cvt_deploy.bundle import Bundle
from cvt_deploy.errors import CvtDeployError
from cvt_deploy.trt.util import TENSORRT_RTX, tensorrt_unavailable_reason

RTX_MISSING = tensorrt_unavailable_reason(TENSORRT_RTX)
needs_rtx = pytest.mark.skipif(RTX_MISSING is not None, reason=f"needs TensorRT-RTX (pip install 'cvt-deploy[rtx]'): "
                                                                 f"{RTX_MISSING}")
TRT_PACKAGE = Path(__file__).resolve().parent.parent / "cvt_deploy" / "trt"


def _rtx_version() -> str:
    import tensorrt_rtx

    return str(tensorrt_rtx.__version__)


# ---------------------------------------------------------------------------------------
# The export's stage: every TensorRT-bound graph parsed and built, recorded in the manifest


@needs_rtx
def test_every_tensorrt_bound_graph_of_the_exports_is_built_by_tensorrt_rtx(demo_bundle: Path,
                                                                             demo_full_bundle: Path) -> None:
    from cvt_deploy.trt.readiness import portable_graphs

    for root in (demo_bundle, demo_full_bundle):
        bundle = Bundle.open(root)
        graphs = portable_graphs(bundle)
        assert graphs
        for art in graphs:
            record = art.info.get("tensorrt_rtx")
            assert record is not None, f"{art.file} of {root} was not built by TensorRT-RTX"
            assert record["built"] is True and record["version"] == _rtx_version()
            assert record["layers"] > 100 and record["seconds"] > 0
    full = Bundle.open(demo_full_bundle)
    assert {a.file for a in portable_graphs(full)} == {"model.onnx", "model.fp16.onnx", "model.int8.onnx",
                                                       "model.int8-fp16.onnx"}
    # the CPU-only graphs are not TensorRT's: not built
    assert all("tensorrt_rtx" not in a.info for a in full.artifacts.values() if a.target == "onnxruntime-cpu")


@needs_rtx
@pytest.mark.parametrize("input_format,output", [("uint8-nhwc", "probs"), ("float-pixels", "probs")])
def test_raw_pixel_graphs_parse_and_build(demo_full_bundle: Path, tmp_path: Path, input_format: str,
                                          output: str) -> None:
    from conftest import raw_pixel_copy

    from cvt_deploy.trt.rtx import check_builds

    bundle = Bundle.open(raw_pixel_copy(demo_full_bundle, tmp_path / "raw", input_format, output))
    reports = check_builds(bundle, progress=False)
    assert len(reports) == 4 and all(reports), "\n".join(map(str, reports))
    # the builder's own words come back (the int8+fp16 graph's conv scales are converted to fp32)
    int8_fp16 = next(r for r in reports if r.graph == "model.int8-fp16.onnx")
    assert any("scales to fp32" in w for w in int8_fp16.warnings), int8_fp16.warnings


@needs_rtx
def test_a_graph_the_parser_refuses_fails_with_the_parsers_words(bundle_copy: Path) -> None:
    import onnx
    from onnx import helper

    from cvt_deploy.trt.rtx import require_builds

    bundle = Bundle.open(bundle_copy)
    art = bundle.artifacts["onnx-fp32"]
    model = onnx.load(str(bundle.path(art)))
    out = model.graph.output[0].name
    # a node of a domain no parser knows, on the way to the output
    last = next(n for n in model.graph.node if out in n.output)
    last.output[list(last.output).index(out)] = "planted_in"
    model.graph.node.append(helper.make_node("Mystery", ["planted_in"], [out], name="planted_mystery", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(bundle.path(art)))
    with changing(bundle):
        bundle.add(art)
    before = json.loads((bundle_copy / "manifest.json").read_text())
    with pytest.raises(CvtDeployError) as e:
        require_builds(bundle, progress=False)
    assert "model.onnx: parse failed" in e.value.message and "planted_mystery" in e.value.message
    assert "TensorRT-RTX" in e.value.message and "--no-rtx-build" in (e.value.hint or "")
    assert json.loads((bundle_copy / "manifest.json").read_text()) == before  # nothing recorded

    from cvt_deploy.cli.check import main

    assert main(["--bundle", str(bundle_copy), "--tensorrt", "10", "-q"]) == 1


@needs_rtx
def test_cvt_check_shows_the_real_parser_beside_the_static_check(demo_bundle: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.cli.check import main

    assert main(["--bundle", str(demo_bundle), "--tensorrt", "8.6,10", "-q"]) == 0
    out = capsys.readouterr().out
    assert "real parser" in out and f"TensorRT-RTX {_rtx_version()}" in out and "built" in out
    assert "not the TensorRT 8.5/8.6/10.3 of a Jetson" in out
    assert main(["--bundle", str(demo_bundle), "--tensorrt", "10", "--json", "-q"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert reports and all(r["real_parser"]["built"] and r["real_parser"]["layers"] > 100 for r in reports)


# ---------------------------------------------------------------------------------------
# The static rules against the real parser: every planted violation of test_readiness.py

#: What TensorRT-RTX 1.7 does with each planted violation that it refuses, and the words it says.
REFUSED_BY_RTX = {
    "zero_point_3": "Non-zero zero point is not supported",
    "custom_domain_op": "MultiHeadAttention",
    "per_channel_scale_count": "The number of scales is not equal to the number of output channels",
    "quantize_input_and_scale_types_differ_at_opset_21": "must have same input types",
}
#: Planted graphs the static "10" rules refuse and TensorRT-RTX builds, and why each rule stays.
#: ("10" means JetPack 6.1/6.2's TensorRT 10.3, read from onnx-tensorrt release/10.0-GA; TensorRT-RTX
#: 1.7's parser is newer.)
STRICTER_THAN_RTX = {
    "uint8_quantization": "the TensorRT 10 guide's explicit quantization is INT8 (FP8/INT4); the newer parser takes UINT8",
    "per_channel_axis_1_on_Conv_transB0": "square weights make the count fit; the guide puts weight scales on the output "
                                          "channel, off it the layer is not the int8 layer meant",
    "per_channel_axis_0_on_ConvTranspose_transB0": "as above",
    "per_channel_axis_0_on_MatMul_transB0": "as above",
    "per_channel_axis_1_on_Gemm_transB1": "as above",
    "per_channel_axis_0_on_Gemm_transB0": "as above",
    "conv_with_dq_weights_and_no_kernel_shape": "the multi-input Conv importer reads only the attribute through 10.3 "
                                                "(fixed in onnx-tensorrt 10.4); the newer parser infers it",
    "qdq_without_zero_point_or_axis": "release/10.0-GA reads an omitted axis as 0 where ONNX means 1; the newer parser "
                                      "reads 1 (its scale-count check would refuse axis 0 here)",
    "dq_into_softmax": "not a parse failure: a Q/DQ pair no layer runs quantized only costs time",
    "dynamic_image_size": "cvt-deploy's own rule: the engines' optimization profile sets the batch only",
    "uint8_input_cast_to_int": "release/10.0-GA takes a UINT8 input only into a Cast to FP32/FP16",
}


@needs_rtx
def test_every_planted_violation_meets_the_real_parser() -> None:
    """Each planted violation of the static readiness tests is parsed and built by TensorRT-RTX. The
    real parser must refuse nothing that the static "10" rules pass (else the rule is wrong); where
    it accepts what "10" refuses, the rule says why it stays; where it accepts what only the 8.x rules
    refuse, "10" passes it too (the release that changed it is the finding's cited source)."""
    from test_readiness import PLANTED

    from cvt_deploy.trt.readiness import check_readiness
    from cvt_deploy.trt.rtx import probe

    verdicts = {}
    for name, factory in PLANTED.items():
        report = probe(factory(), name)
        static = {v: bool(check_readiness(factory(), v)) for v in ("8.5", "8.6", "10")}
        verdicts[name] = (report, static)
        if not report:
            assert not static["10"], f"{name}: the static 10 rules pass what TensorRT-RTX refuses: {report}"
    refused = {name: r for name, (r, _) in verdicts.items() if not r}
    assert set(refused) == set(REFUSED_BY_RTX), {n: str(r) for n, r in refused.items()}
    for name, words in REFUSED_BY_RTX.items():
        assert any(words in e for e in refused[name].errors), str(refused[name])
    stricter = {name for name, (r, static) in verdicts.items() if r and not static["10"]}
    assert stricter == set(STRICTER_THAN_RTX), stricter
    for name, (r, static) in verdicts.items():
        if r and not (static["8.5"] and static["8.6"]):
            assert static["10"] or name in STRICTER_THAN_RTX, name


# ---------------------------------------------------------------------------------------
# cvt-export --format trt-rtx: engines with sidecars, and a runtime refused without a GPU


@needs_rtx
def test_export_trt_rtx_writes_engines_with_sidecars(demo_full_bundle: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.cli.export import main
    from cvt_deploy.trt.sidecar import EngineMeta
    from cvt_deploy.util import file_sha256

    root = tmp_path / "b"
    shutil.copytree(demo_full_bundle, root)
    assert main(["--format", "trt-rtx", "--bundle", str(root), "--precision", "fp32,fp16,int8", "--no-check"]) == 0
    err = capsys.readouterr().err
    assert "building TensorRT-RTX int8 engine from model.int8-fp16.onnx" in err
    bundle = Bundle.open(root)
    for precision, source in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"), ("int8", "model.int8-fp16.onnx")):
        art = bundle.artifacts[f"tensorrt-rtx-{precision}"]
        assert art.file == f"model.{precision}.rtx.engine" and bundle.verified_path(art).stat().st_size > 1 << 20
        meta = EngineMeta.read(bundle.sidecar_path(art))
        assert meta.toolkit == "TensorRT-RTX" and meta.tensorrt_version == _rtx_version()
        assert meta.targets == ["8.0", "8.6", "8.9", "12.0"] and meta.strongly_typed and meta.builder_flags == []
        assert meta.onnx_file == source and meta.onnx_sha256 == file_sha256(root / source)
        assert (meta.batch.min, meta.batch.opt, meta.batch.max) == (bundle.batch.min, bundle.batch.opt, bundle.batch.max)
        assert art.info["layers"] > 100


@needs_rtx
def test_export_trt_rtx_refuses_gpu_only_options_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.cli.export import main

    out = tmp_path / "never"
    assert main(["--format", "trt-rtx", "--timing-cache", str(tmp_path / "c"), "--out", str(out)]) == 2
    assert "--timing-cache" in capsys.readouterr().err and not out.exists()


def test_the_rtx_runtime_runs_where_a_gpu_is_and_is_refused_elsewhere(demo_full_bundle: Path, tmp_path: Path) -> None:
    import cvt_deploy.backends as rt
    from cvt_deploy.trt.runner import TensorRTRTXRuntime

    reason = TensorRTRTXRuntime.unavailable_reason()
    if reason is None:  # a machine with TensorRT-RTX, cuda-python and a GPU: it must run (never in CI)
        pytest.skip("a GPU is here: the run is covered by the GPU checks (docs/tensorrt.md), not this CPU test")
    assert rt.available_backends()["tensorrt-rtx"] == reason
    with pytest.raises(CvtDeployError) as e:
        rt.load(demo_full_bundle, backend="tensorrt-rtx")
    assert "tensorrt-rtx cannot run here" in e.value.message and reason in e.value.message
    assert "GPU" in (e.value.hint or "")


# ---------------------------------------------------------------------------------------
# The audit's findings in the build code


def _guarded_uses(path: Path, names: dict[str, Any]) -> list[str]:
    """Uses of API listed in ``names`` (e.g. ``HardwareCompatibilityLevel``) that no version check
    guards: each must sit under an ``if``/conditional whose test reads SINCE or hasattr."""
    tree = ast.parse(path.read_text())
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def checks_version(test: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id in ("SINCE", "hasattr") for n in ast.walk(test))

    def guarded(node: ast.AST) -> bool:
        line = getattr(node, "lineno", 0)
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.If, ast.IfExp)) and checks_version(node.test):
                return True
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(  # an early return before it
                    isinstance(st, ast.If) and st.lineno < line and checks_version(st.test)
                    and isinstance(st.body[-1], ast.Return) for st in node.body):
                return True
        return False

    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            for name in names:
                if (dotted.endswith("." + name) or dotted == name) and dotted.startswith("trt.") and not guarded(node):
                    bad.append(f"{path.name}:{node.lineno}: {dotted}")
    return bad


def test_no_api_newer_than_the_oldest_supported_tensorrt_is_reached_unguarded() -> None:
    """TensorRT 8.5's bindings lack HardwareCompatibilityLevel and LayerType.NORMALIZATION (first
    in release/8.6 pyCore.cpp / pyGraph.cpp): reading either on every build raised AttributeError."""
    from cvt_deploy.trt.builder import MIN_TENSORRT, SINCE

    assert MIN_TENSORRT == (8, 5) and SINCE["HardwareCompatibilityLevel"] == (8, 6)
    bad = [use for path in sorted(TRT_PACKAGE.glob("*.py")) for use in _guarded_uses(path, SINCE)]
    assert not bad, bad


def test_a_strongly_typed_int8_build_without_the_int8_fp16_graph_says_so(demo_full_bundle: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.trt.loader import source_graph

    root = tmp_path / "b"
    shutil.copytree(demo_full_bundle, root)
    bundle = Bundle.open(root)
    assert source_graph(bundle, "int8", True, "10.3.0").file == "model.int8-fp16.onnx"
    assert "warning" not in capsys.readouterr().err
    del bundle.artifacts["onnx-int8-tensorrt-10"]
    assert source_graph(bundle, "int8", True, "10.3.0").file == "model.int8.onnx"
    err = capsys.readouterr().err
    assert "warning: " in err and "no int8+fp16 graph" in err and "runs in fp32" in err
    assert f"cvt-export --precision int8 --out {root}" in err
    # weakly typed (8.x) builds take the Q/DQ graph with the FP16 flag: nothing to warn about
    assert source_graph(bundle, "int8", False, "8.6.1").file == "model.int8.onnx"
    assert "warning" not in capsys.readouterr().err


def test_without_tensorrt_rtx_the_export_says_so_and_which_extra(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from cvt_deploy.cli.check import main
    from cvt_deploy.trt.rtx import require_builds, rtx_missing

    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # as on a machine without the 'rtx' extra
    reason = rtx_missing() or ""
    assert "TensorRT-RTX is not installed" in reason and "pip install 'cvt-deploy[rtx]'" in reason
    before = (bundle_copy / "manifest.json").read_text()
    assert require_builds(Bundle.open(bundle_copy), progress=True) == []
    assert "note: no real TensorRT parse or build" in capsys.readouterr().err
    assert (bundle_copy / "manifest.json").read_text() == before
    assert main(["--bundle", str(bundle_copy), "--tensorrt", "10", "-q"]) == 0  # the static check stands alone
    assert "real parser: not checked" in capsys.readouterr().out
