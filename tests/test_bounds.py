"""Sizes are bounded before memory is: a config, manifest or JSON file from someone else that
asks for an absurd model, or is absurd itself, is refused with the field and the limit before
anything is allocated for it. The process-level cases run the command a user would and read the
child's peak memory from the kernel (wait4), so "refused early" is measured, not assumed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import refused, run_cli, script, snapshot  # noqa: E402
from cvt_deploy import geometry  # noqa: E402
from cvt_deploy.bundle import Bundle  # noqa: E402
from cvt_deploy.config import ARCH_FIELDS, CvtConfig, get_config  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.jsonio import MAX_JSON_BYTES, read_json  # noqa: E402

DEMO_SAMPLES = Path(__file__).resolve().parent.parent / "cvt_deploy" / "demo" / "samples"
# A refusal happens after imports (torch, onnxruntime: a few hundred MB); an attempt to build
# what the file asks for would need many GB.
PEAK_LIMIT_MB = 1500


def tiny(**changes) -> dict:
    # Per-stage fields left out take the paper's values for however many stages are asked.
    d = {k: v for k, v in get_config("cvt-tiny").to_dict().items()
         if k not in ARCH_FIELDS or k in ("embed_dims", "num_heads", "depths", "in_chans")}
    d.update(changes)
    return d


@pytest.mark.parametrize("changes, words", [
    ({"embed_dims": [4096, 8192, 16384], "num_heads": [1, 1, 1]}, ["parameters, over the limit of 1,073,741,824"]),
    ({"depths": [1, 2, 5000]}, ["'depths' (1, 2, 5000) asks for 5003 blocks", "at most 4096"]),
    ({"embed_dims": [16] * 100, "num_heads": [1] * 100, "depths": [1] * 100}, ["lists 100 stages", "at most 64"]),
    ({"img_size": 16384, "preprocess": {**get_config("cvt-tiny").preprocess.to_dict(), "size": 16384}},
     ["at img_size 16384 one image makes a tensor of", "over the limit of 1,073,741,824"]),
    ({"embed_dims": [16, 32, 1024], "num_heads": [1, 2, 4], "num_classes": 1 << 22, "labels": None},
     ["num_classes 4194304", "parameters, over the limit"]),
])
def test_absurd_architectures_are_refused_with_the_field_and_the_limit(changes, words):
    with pytest.raises(CvtDeployError) as e:
        CvtConfig.from_dict(tiny(**changes), "config.json")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_the_estimates_are_the_real_model_within_a_percent():
    """The bound is only as good as the estimate: check it against built models."""
    from cvt_deploy.model import CvT, count_params

    for variant in ("cvt-tiny", "cvt-13"):
        cfg = get_config(variant)
        assert abs(geometry.param_estimate(cfg) / count_params(CvT(cfg)) - 1) < 0.01
    # CvT-W24 at 384 (the largest released) is far inside both limits.
    w24 = get_config("cvt-w24")
    assert geometry.param_estimate(w24) < geometry.MAX_PARAMS / 3
    assert geometry.largest_activation(w24) < geometry.MAX_ACTIVATION / 10


MEASURE = """
import os, subprocess, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\npeak-rss-kb {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(name: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The installed command ``name`` run as a user runs it, with its own peak memory in MB."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, script(name), *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    err, _, peak = proc.stderr.rpartition("\npeak-rss-kb ")
    assert 10 < int(peak) / 1024, "the measurement must see at least the interpreter"
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, err), int(peak) / 1024


def set_model(bundle: Path, **fields) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"].update(fields)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_asking_for_a_huge_input_is_refused_before_preprocessing(bundle_copy):
    """Without the bound, cvt-predict would resize the image to 32768 x 32768 (12 GB of floats)."""
    pre = json.loads((bundle_copy / "manifest.json").read_text())["model"]["preprocess"]
    set_model(bundle_copy, img_size=32768, preprocess={**pre, "size": 32768})
    before = snapshot(bundle_copy)
    proc, peak = measured("cvt-predict", "--bundle", str(bundle_copy), str(DEMO_SAMPLES / "digit-1.png"))
    refused(proc, "manifest.json is damaged", "at img_size 32768 one image makes a tensor of", "over the limit")
    assert peak < PEAK_LIMIT_MB, f"peak {peak:.0f} MB before refusing"
    assert snapshot(bundle_copy) == before


def test_an_hf_config_asking_for_a_huge_model_is_refused_before_the_model_is_built(hf_cvt_checkpoint, tmp_path):
    folder = tmp_path / "hub"
    shutil.copytree(hf_cvt_checkpoint("tiny", num_labels=10).folder, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(embed_dim=[4096, 8192, 16384], num_heads=[1, 2, 4], depth=[1, 2, 60])
    (folder / "config.json").write_text(json.dumps(raw))
    proc, peak = measured("cvt-export", "--weights", str(folder), "--out", str(tmp_path / "b"), "--no-check")
    refused(proc, str(folder / "config.json"), "parameters, over the limit of 1,073,741,824")
    assert peak < PEAK_LIMIT_MB, f"peak {peak:.0f} MB before refusing"
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name, text, words", [
    ("a number out of range", '{"a": 1e400}', ["the number 1e400 is out of range"]),
    ("NaN", '{"a": NaN}', ["NaN is not a number JSON allows"]),
    ("-Infinity", '{"a": -Infinity}', ["-Infinity is not a number JSON allows"]),
    ("deep nesting", "[" * 200_000 + "]" * 200_000, ["nests deeper than cvt-deploy reads"]),
    ("an integer of 10,000 digits", '{"a": ' + "9" * 10_000 + "}", ["digits"]),
    ("bytes that are not UTF-8", b'{"a": "\xff\xfe"}', ["utf-8"]),
])
def test_json_that_python_would_misread_is_a_value_error(tmp_path, name, text, words):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as e:
        read_json(path)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_huge_json_file_is_refused_by_its_size_without_reading_it(tmp_path):
    path = tmp_path / "x.json"
    with open(path, "wb") as f:  # sparse: the size is real, the disk is not used
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(ValueError, match=f"it is {MAX_JSON_BYTES + 1:,} bytes, over the 64 MiB"):
        read_json(path)


def test_a_huge_manifest_is_refused_by_size(bundle_copy):
    manifest = bundle_copy / "manifest.json"
    with open(manifest, "r+b") as f:
        f.truncate(MAX_JSON_BYTES * 4)
    proc, peak = measured("cvt-predict", "--bundle", str(bundle_copy), str(DEMO_SAMPLES / "digit-1.png"))
    refused(proc, f"{manifest} is damaged", "over the 64 MiB a cvt-deploy JSON file may be")
    assert peak < PEAK_LIMIT_MB


@pytest.mark.parametrize("text, words", [
    ('{"format": "cvt-deploy-bundle", "model": {"img_size": 1e400}}', ["the number 1e400 is out of range"]),
    ('{"format": "cvt-deploy-bundle", "batch": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nests deeper"]),
    ('{"format": "cvt-deploy-bundle", "model": {"img_size": NaN}}', ["NaN is not a number JSON allows"]),
])
def test_a_hostile_manifest_is_a_clean_error(bundle_copy, text, words):
    (bundle_copy / "manifest.json").write_text(text)
    refused(run_cli("cvt-check", "--bundle", str(bundle_copy)), "manifest.json is damaged", *words)


def test_hostile_numbers_in_given_configs_and_checkpoint_metadata(tmp_path, hf_cvt_checkpoint):
    from safetensors.torch import load_file, save_file

    from cvt_deploy.checkpoints import load_checkpoint, save_checkpoint
    from cvt_deploy.model import create_model

    folder = tmp_path / "hub"
    shutil.copytree(hf_cvt_checkpoint("tiny", num_labels=10).folder, folder)
    (folder / "preprocessor_config.json").write_text('{"size": 64, "crop_pct": 1e400}')
    refused(run_cli("cvt-export", "--weights", str(folder), "--out", str(tmp_path / "b"), "--no-check"),
            "preprocessor_config.json is not valid JSON", "1e400 is out of range")
    assert not (tmp_path / "b").exists()

    path = save_checkpoint(create_model("cvt-tiny", num_classes=3), tmp_path / "m.safetensors")
    meta = get_config("cvt-tiny", num_classes=3).to_json().replace('"img_size": 64', '"img_size": 1e400')
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"cvt_deploy.config": meta})
    with pytest.raises(CvtDeployError, match="bad.safetensors \\(its cvt-deploy metadata\\) is not valid JSON "
                                             "\\(the number 1e400 is out of range\\)"):
        load_checkpoint(tmp_path / "bad.safetensors")

    given = tmp_path / "given.json"
    given.write_text('{"num_heads": [1, 2, 4], "img_size": Infinity}')
    refused(run_cli("cvt-export", "--weights", str(path), "--config", str(given), "--out", str(tmp_path / "c")),
            "given.json is not valid JSON", "Infinity is not a number JSON allows")


def test_a_bundle_within_the_bounds_still_opens(demo_bundle):
    assert Bundle.open(demo_bundle).config.img_size == 64
