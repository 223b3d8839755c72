"""Layer names: every weighted node of a bundle's graphs named by the PyTorch module it computes,
the same in each graph (export/names.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")

from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.export.names import describe, layer_table, module_names, resolve  # noqa: E402


def _load(bundle: Path, name: str):
    return onnx.load(str(bundle / name), load_external_data=False)


def test_every_graph_of_a_bundle_names_its_layers_alike(demo_full_bundle: Path, demo_model) -> None:
    fp32 = layer_table(_load(demo_full_bundle, "model.onnx"))
    for graph in ("model.fp16.onnx", "model.int8.onnx", "model.int8-fp16.onnx"):
        assert layer_table(_load(demo_full_bundle, graph)) == fp32, graph
    modules = {m for _, _, m in fp32 if m}
    # the names a state_dict has: every Conv and Linear of the model
    weighted = {name.rsplit(".", 1)[0] for name, p in demo_model.state_dict().items()
                if name.endswith(".weight") and p.dim() in (2, 4)}
    assert modules == weighted, weighted ^ modules
    unnamed = [(n, op) for n, op, m in fp32 if not m]
    assert unnamed and all(op == "MatMul" for _, op in unnamed)  # attention's activation x activation MatMuls
    # the ONNX Runtime CPU int8 graph keeps the node names of the layers it quantizes
    cpu = module_names(_load(demo_full_bundle, "model.ort-cpu.int8.onnx"))
    assert cpu and all(module_names(_load(demo_full_bundle, "model.onnx"))[n] == m for n, m in cpu.items())


def test_names_resolve_by_module_prefix_or_node_and_unknown_ones_are_refused(demo_full_bundle: Path) -> None:
    model = _load(demo_full_bundle, "model.int8.onnx")
    modules = module_names(model)
    block = resolve(model, ["stage2.blocks.1"])
    assert block and all(modules[n].startswith("stage2.blocks.1.") for n in block if n in modules)
    (proj,) = resolve(model, ["stage2.blocks.1.attn.proj"])
    assert modules[proj] == "stage2.blocks.1.attn.proj" and resolve(model, [proj]) == [proj]
    assert describe(proj, modules) == f"stage2.blocks.1.attn.proj ({proj})"
    with pytest.raises(CvtDeployError) as e:
        resolve(model, ["stage2.block.1.attn.proj", "head"])
    assert "'stage2.block.1.attn.proj' is no layer" in e.value.message and "stage2.blocks.1.attn" in e.value.message
    assert "cvt-check --layers" in (e.value.hint or "")
