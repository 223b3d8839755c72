"""Reliability under faults and bad input, tried as a careful but unlucky user would.

Every case runs a command as a user types it (in this process through its entry point;
in a subprocess where the case is about the process: signals and kills; a few library
calls where the case is about the API) and asserts: the exit code, no traceback, a message that names the
problem and the fix, and that the user's files are byte for byte what they were. Full and
read-only disks are real tmpfs mounts; those cases skip with the reason where mounting is
not permitted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from conftest import default_signals, refused, run_cli, script, snapshot, tmpfs  # noqa: E402
from cvt_deploy.bundle import JOURNAL, Bundle  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402


# --- helpers ---------------------------------------------------------------------------------



def partials(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith(".partial"))


def user_files(folder: Path) -> dict[str, str]:
    """A user's own files, as they would sit in a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return snapshot(folder)


def export(out: str | Path, *args: str, cwd: Path | None = None, ort_cpu: bool = False) -> subprocess.CompletedProcess[str]:
    """cvt-export without the parity check, the CPU-path timing and the TensorRT-RTX build (and,
    unless asked, without the ORT-CPU graphs): quicker; these tests are about the files."""
    return run_cli("cvt-export", "--out", str(out), "--no-check", "--no-timing", "--no-rtx-build", "-q", *args,
                   *([] if ort_cpu else ["--no-ort-cpu"]),
                   cwd=cwd)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (pixels need not follow: PIL checks the size first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


def predict_json(bundle: Path, *files: Path | str, extra: tuple[str, ...] = ()) -> list[dict]:
    proc = run_cli("cvt-predict", "--bundle", str(bundle), "--json", *extra, *map(str, files))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return json.loads(proc.stdout)


# --- data loss: --out and --calib-cache ---------------------------------------------------------

@pytest.mark.parametrize("manifest", ["not json at all", '{"name": "my project", "files": []}',
                                      '{"format": "some-other-tool", "artifacts": {}}', "[1, 2, 3]"])
def test_a_folder_with_someone_elses_manifest_is_never_written_to(tmp_path, manifest):
    out = tmp_path / "project"
    before = user_files(out)
    (out / "manifest.json").write_text(manifest)
    before = snapshot(out)
    refused(export(out), "holds no cvt-deploy bundle", "manifest.json", "choose an empty or new --out")
    assert snapshot(out) == before and not partials(out, tmp_path)


def test_a_users_file_where_the_new_bundle_writes_is_refused_before_any_work(bundle_copy, no_work):
    (bundle_copy / "model.int8.onnx").write_bytes(b"my own int8 experiment")
    before = snapshot(bundle_copy)
    err = refused(export(bundle_copy, "--precision", "int8"), "model.int8.onnx", "not part of its bundle")
    assert "move those files" in err
    assert snapshot(bundle_copy) == before


ODD_NAMES = [".", "./", "./.", "..", "a/..", "", "/", "/etc/hostname", "model.onnx\0x", "photos", "photos/x.jpg",
             "notes.txt/.", "./model.onnx"]


def _name_in_manifest(bundle: Path, artifact: str, key: str, name: str) -> dict[str, str]:
    """Edit the bundle's manifest as a hand would; add a user's notes and photos; their snapshot."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"][artifact][key] = name
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "notes.txt").write_text("my notes\n")
    (bundle / "photos").mkdir()
    (bundle / "photos" / "x.jpg").write_bytes(os.urandom(64))
    return {k: v for k, v in snapshot(bundle).items() if k in ("notes.txt", "photos/x.jpg")}


@pytest.mark.parametrize("artifact,key", [("onnx-fp32-onnxruntime-cpu", "file"), ("onnx-fp32", "labels")])
@pytest.mark.parametrize("name", ODD_NAMES)
def test_an_old_manifest_entry_that_names_no_file_of_the_bundle_claims_nothing(bundle_copy, stub_export_onnx, artifact,
                                                                                key, name):
    """A hand-edited manifest naming the folder itself, a place outside it, a user's folder or a
    file deeper down: replacing the bundle ignores the entry (as the earlier sandbox mend ignores
    names that climb out), so the folder, the user's files and the new bundle all survive."""
    mine = _name_in_manifest(bundle_copy, artifact, key, name)
    proc = export(bundle_copy, "--format", "onnx")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    after = snapshot(bundle_copy)
    assert {k: after.get(k) for k in mine} == mine
    assert set(Bundle.open(bundle_copy).artifacts) == {"onnx-fp32", "torch-fp32"}
    assert JOURNAL not in after and not partials(bundle_copy, bundle_copy.parent)


@pytest.mark.parametrize("name", [".", "./model.onnx"])
def test_an_odd_entry_for_a_file_the_new_bundle_writes_is_refused_naming_it(bundle_copy, no_work, name):
    """The graph the odd entry stood for is then nobody's: the clash refusal names the entry too."""
    _name_in_manifest(bundle_copy, "onnx-fp32", "file", name)
    before = snapshot(bundle_copy)
    err = refused(export(bundle_copy, "--format", "onnx"), "model.onnx", repr(name), "not part of its bundle")
    assert "move those files" in err and snapshot(bundle_copy) == before


@pytest.mark.parametrize("name", ["calib.npy", "notes.txt", "other.json"])
def test_calib_cache_never_overwrites_a_users_file(tmp_path, name):
    user = tmp_path / name
    user.write_bytes(b"\x93NUMPY user data" if name.endswith(".npy") else b'{"mine": true}')
    before = user.read_bytes()
    refused(export(tmp_path / "out", "--precision", "int8", "--calib-cache", str(user)),
            str(user), "not a cvt-deploy calibration cache")
    assert user.read_bytes() == before and not (tmp_path / "out").exists()


def test_reexport_keeps_user_files_through_a_symlink_on_a_mount_point(tmp_path):
    """The usual container volume: --out is a mount point (cannot be renamed), reached by a
    symlink; the second export replaces the bundle in place, keeps the user's files, and
    drops the old bundle's fp16 graph that the new bundle no longer has."""
    with tmpfs(tmp_path / "volume", size="64m") as vol:
        link = tmp_path / "link"
        link.symlink_to(vol, target_is_directory=True)
        first = export(vol, "--precision", "fp16", "--opset", "18", "--tensorrt", "10", ort_cpu=True)
        assert first.returncode == 0, first.stderr[-2000:]
        manifest = json.loads((vol / "manifest.json").read_text())
        assert manifest["artifacts"]["onnx-fp32"]["opset"] == 18 and (vol / "model.ort-cpu.onnx").is_file()
        import onnx

        assert [o.version for o in onnx.load(str(vol / "model.onnx")).opset_import if o.domain in ("", "ai.onnx")] == [18]
        mine = user_files(vol)
        mine = {k: v for k, v in mine.items() if k in ("notes.txt", "sub/data.bin")}
        second = export(link)
        assert second.returncode == 0, second.stderr[-2000:]
        assert link.is_symlink() and vol.is_mount()
        after = snapshot(vol)
        assert {k: after[k] for k in mine} == mine
        assert "model.fp16.onnx" not in after and "model.ort-cpu.onnx" not in after
        assert not partials(vol, tmp_path) and JOURNAL not in after
        assert set(Bundle.open(link).artifacts) == {"onnx-fp32", "torch-fp32"}


def test_export_to_dot(tmp_path):
    here = tmp_path / "work"
    here.mkdir()
    proc = export(".", cwd=here)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(Bundle.open(here).artifacts) == {"onnx-fp32", "torch-fp32"} and not partials(here, tmp_path)


# --- faults of the operating system -------------------------------------------------------------

@pytest.mark.parametrize("pid", ["\u00b9", "\u0663"])
def test_a_partial_name_whose_pid_only_looks_like_a_number_is_left_and_named(tmp_path, stub_export_onnx, pid):
    """'.out.¹.x.partial' beside --out: str.isdigit takes '¹', int refuses it; '٣' int reads as pid 3.
    Neither is a pid cvt-export wrote, so the file is someone else's: left, named, no traceback."""
    other = tmp_path / f".bundle.{pid}.abc123.partial"
    other.write_text("another tool's temporary file\n")
    proc = run_cli("cvt-export", "--out", str(tmp_path / "bundle"), "--no-check", "--no-timing", "--no-ort-cpu")  # notes: not -q
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert other.read_text() == "another tool's temporary file\n" and f"note: left {other}" in proc.stderr, proc.stderr


def test_disk_full_during_export_leaves_nothing_and_says_so(tmp_path):
    with tmpfs(tmp_path / "small", size="1200k") as disk:
        err = refused(export(disk / "bundle"), "no space left", str(disk / "bundle"), "free space")
        assert snapshot(disk) == {} and not partials(disk), snapshot(disk)
        assert "Traceback" not in err


def test_disk_full_for_the_calibration_cache_does_not_fail_the_export(tmp_path):
    with tmpfs(tmp_path / "full", size="64k") as disk:
        (disk / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))
        with contextlib.suppress(OSError):
            with open(disk / "more", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        proc = run_cli("cvt-export", "--out", str(tmp_path / "b"), "--no-check", "--no-timing", "--precision", "int8",
                       "--calib-cache", str(disk / "cache"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "calibration cache not written" in proc.stderr and "Traceback" not in proc.stderr
    assert "onnx-int8" in Bundle.open(tmp_path / "b").artifacts


def test_read_only_out_is_refused_at_once(tmp_path, no_work):
    with tmpfs(tmp_path / "ro", readonly=True) as disk:
        refused(export(disk / "bundle"), "read-only", str(disk))
        refused(export(disk), "read-only", str(disk))


def test_immutable_out_folder(tmp_path, no_work):
    out = tmp_path / "frozen"
    out.mkdir()
    proc = subprocess.run(["chattr", "+i", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr +i is not supported here ({proc.stderr.strip()})")
    try:
        refused(export(out), "not permitted", "chattr -i")
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)


# --- leftovers of killed runs -------------------------------------------------------------------

def _start_export(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([script("cvt-export"), "--out", str(out), "--precision", "fp16,int8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _wait_for_partial(proc: subprocess.Popen[str], *folders: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not partials(*folders):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_terminated_export_cleans_up_and_keeps_the_old_bundle(bundle_copy, sig):
    before = snapshot(bundle_copy)
    proc = _start_export(bundle_copy)
    try:
        _wait_for_partial(proc, bundle_copy, bundle_copy.parent)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and "nothing was left half-written" in err
    assert snapshot(bundle_copy) == before and not partials(bundle_copy, bundle_copy.parent)


def test_what_sigkill_leaves_is_cleaned_by_the_next_export(bundle_copy):
    proc = _start_export(bundle_copy)
    try:
        _wait_for_partial(proc, bundle_copy, bundle_copy.parent)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    left = partials(bundle_copy, bundle_copy.parent)
    assert left  # SIGKILL cannot be handled: this is what the next run must deal with
    Bundle.open(bundle_copy)  # the old bundle is still whole
    again = export(bundle_copy)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not partials(bundle_copy, bundle_copy.parent)
    assert set(Bundle.open(bundle_copy).artifacts) == {"onnx-fp32", "torch-fp32"}


def test_a_replacement_killed_half_way_is_reported_not_read(bundle_copy):
    # What a run killed while moving files into --out leaves: its journal (pid of no process).
    (bundle_copy / JOURNAL).write_text(json.dumps({"pid": 2 ** 22 + 1, "files": ["model.onnx", "manifest.json"]}))
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), __file__), "interrupted", "export again")
    refused(run_cli("cvt-check", "--bundle", str(bundle_copy)), "incomplete")


def test_signals_stop_other_commands_cleanly(demo_bundle, tmp_path):
    proc = subprocess.Popen([script("cvt-bench"), "--bundle", str(demo_bundle), "--min-time", "30",
                             "--save", str(tmp_path / "b.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert not (tmp_path / "b.json").exists() and not partials(tmp_path)


# --- images: one rule for every mode, or a clear refusal ---------------------------------------

@pytest.fixture(scope="module")
def digit_variants(tmp_path_factory) -> dict[str, Path]:
    """One held-out digit saved as 8-bit, 16-bit, float (mode F) and EXIF-rotated files."""
    from cvt_deploy.demo import demo_split

    folder = tmp_path_factory.mktemp("variants")
    digit = demo_split("test").images[7]
    up = Image.fromarray(digit)
    paths = {"8bit": folder / "d8.png", "16bit": folder / "d16.png", "float": folder / "dF.tif",
             "float_png_rgb": folder / "d8rgb.png"}
    up.save(paths["8bit"])
    Image.fromarray(digit.astype(np.uint16) * 257).save(paths["16bit"])
    Image.fromarray(digit.astype(np.float32) / 255).save(paths["float"])
    up.convert("RGB").save(paths["float_png_rgb"])
    for tag, method in ((3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = tag
        paths[f"exif{tag}"] = folder / f"exif{tag}.png"
        up.transpose(method).save(paths[f"exif{tag}"], exif=exif)
    return paths


def test_every_bit_depth_and_orientation_reads_as_the_same_picture(demo_bundle, digit_variants):
    assert Image.open(digit_variants["16bit"]).mode.startswith("I;16")
    assert Image.open(digit_variants["float"]).mode == "F"
    preds = predict_json(demo_bundle, *digit_variants.values())
    reference = preds[0]["top"]
    for name, pred in zip(digit_variants, preds):
        assert pred["top"] == reference, name


@pytest.mark.parametrize("values,words", [((-0.5, 0.5), ["-0.5", "0..1"]), ((0.0, 255.0), ["255", "0..1"]),
                                          ((0.0, float("nan")), ["NaN"])])
def test_a_float_image_outside_0_1_is_refused_not_clipped(demo_bundle, tmp_path, values, words):
    arr = np.full((8, 8), values[0], np.float32)
    arr[4:, :] = values[1]
    Image.fromarray(arr).save(tmp_path / "f.tif")
    refused(run_cli("cvt-predict", "--bundle", str(demo_bundle), str(tmp_path / "f.tif")), "f.tif", *words)


@pytest.mark.parametrize("size,words", [((30000, 30000), ["decompression bomb", "downscale"]),
                                        ((0, 8), ["b.png"]), ((8, 0), ["b.png"])])
def test_bombs_and_empty_images_are_refused(demo_bundle, tmp_path, size, words):
    png_header_only(tmp_path / "b.png", *size)
    refused(run_cli("cvt-predict", "--bundle", str(demo_bundle), str(tmp_path / "b.png")), *words)


def test_empty_images_through_the_api(demo_bundle):
    from cvt_deploy.backends import load

    runtime = load(demo_bundle, backend="onnxruntime")
    for empty in (np.zeros((0, 8, 3), np.uint8), Image.new("RGB", (0, 0)), np.zeros((2, 0, 8, 3), np.uint8)):
        with pytest.raises(CvtDeployError, match="empty"):
            runtime.predict(empty)


def test_one_bad_file_in_a_folder_is_named_or_skipped(demo_bundle, tmp_path, digit_variants):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(digit_variants["8bit"], folder / name)
    (folder / "b.png").write_text("not a picture")
    refused(run_cli("cvt-predict", "--bundle", str(demo_bundle), str(folder)), "b.png", "not a readable image")
    proc = run_cli("cvt-predict", "--bundle", str(demo_bundle), "--json", "--skip-bad", str(folder))
    assert proc.returncode == 0 and "skipped" in proc.stderr and "b.png" in proc.stderr
    assert [Path(p["input"]).name for p in json.loads(proc.stdout)] == ["a.png", "c.png"]


def test_a_folder_of_many_images_streams_in_chunks(demo_bundle, tmp_path, digit_variants, monkeypatch, capsys):
    """predict and cvt-check read a big folder chunk by chunk, never as one array."""
    from cvt_deploy.cli import check as check_cli
    from cvt_deploy.cli import predict as predict_cli
    from cvt_deploy.data import CHUNK

    folder = tmp_path / "many" / "7"
    folder.mkdir(parents=True)
    for i in range(2 * CHUNK + 5):
        shutil.copy(digit_variants["8bit"], folder / f"{i:03d}.png")
    sizes: list[int] = []
    from cvt_deploy.preprocess import preprocess as real

    def counting(images, cfg):
        out = real(images, cfg)
        sizes.append(len(out))
        return out

    monkeypatch.setattr("cvt_deploy.cli.predict.preprocess", counting)
    monkeypatch.setattr("cvt_deploy.data.preprocess", counting)
    assert predict_cli.main(["--bundle", str(demo_bundle), "--json", "--topk", "1", str(folder)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2 * CHUNK + 5
    assert sizes and max(sizes) <= CHUNK and sum(sizes) == 2 * CHUNK + 5
    sizes.clear()
    assert check_cli.main(["--bundle", str(demo_bundle), "--data", str(tmp_path / "many"), "--limit", "1000",
                           "-q", "--json"]) == 0
    capsys.readouterr()
    assert max(sizes) <= CHUNK and sum(sizes) == 2 * CHUNK + 5  # small enough to hold: read once for all runtimes
    # Too big to hold: each runtime (the reference, then each candidate in turn) streams it again.
    monkeypatch.setattr("cvt_deploy.data.HOLD_BYTES", 1)
    sizes.clear()
    assert check_cli.main(["--bundle", str(demo_bundle), "--data", str(tmp_path / "many"), "--limit", "1000",
                           "-q", "--json"]) == 0
    passes = 1 + len(json.loads(capsys.readouterr().out))
    assert passes >= 3 and max(sizes) <= CHUNK and sum(sizes) == passes * (2 * CHUNK + 5)


# --- arguments that make no sense are refused at once, with the valid range ----------------------

@pytest.mark.parametrize("cmd,args,words", [
    ("cvt-export", ["--opset", "99"], ["--opset 99", "valid: 17.."]),
    ("cvt-export", ["--opset", "16"], ["--opset 16", "too old"]),
    ("cvt-export", ["--opset", "0"], ["--opset 0"]),
    ("cvt-export", ["--calib-count", "0", "--precision", "int8"], ["--calib-count 0", ">= 1"]),
    ("cvt-export", ["--calib-count", "-3", "--precision", "int8"], ["--calib-count -3"]),
    ("cvt-export", ["--limit", "-5"], ["--limit -5", ">= 1"]),
    ("cvt-export", ["--limit", "0"], ["--limit 0"]),
    ("cvt-export", ["--batch-range", "0"], ["0"]),
    ("cvt-export", ["--batch-range", "8:4:2"], ["min=8 opt=4 max=2"]),
    ("cvt-export", ["--precision", "int4"], ["int4"]),
    ("cvt-predict", ["--topk", "0"], ["--topk 0", ">= 1"]),
    ("cvt-predict", ["--topk", "-2"], ["--topk -2"]),
    ("cvt-check", ["--limit", "0"], ["limit 0", ">= 1"]),
    ("cvt-check", ["--limit", "-5"], ["-5"]),
    ("cvt-bench", ["--batch", "0"], ["batch size 0"]),
    ("cvt-bench", ["--batch", "100000"], ["100000", "batch range"]),
    ("cvt-bench", ["--threads", "0"], ["--threads 0"]),
    ("cvt-bench", ["--rounds", "0"], ["--rounds 0"]),
    ("cvt-bench", ["--iterations", "0"], ["--iterations 0"]),
    ("cvt-bench", ["--min-time", "-1"], ["--min-time -1"]),
    ("cvt-bench", ["--warmup", "-1"], ["--warmup -1"]),
])
def test_nonsense_arguments_are_refused_at_once(demo_bundle, tmp_path, no_work, cmd, args, words):
    extra = {"cvt-export": ["--out", str(tmp_path / "out")], "cvt-predict": ["--bundle", str(demo_bundle), __file__],
             "cvt-check": ["--bundle", str(demo_bundle)], "cvt-bench": ["--bundle", str(demo_bundle)]}[cmd]
    refused(run_cli(cmd, *extra, *args), *words)
    assert not (tmp_path / "out").exists()


def test_topk_above_the_class_count_shows_every_class(demo_bundle, digit_variants):
    pred = predict_json(demo_bundle, digit_variants["8bit"], extra=("--topk", "100"))
    assert len(pred[0]["top"]) == 10


# --- damaged data and misleading hints -----------------------------------------------------------

@pytest.mark.parametrize("content,words", [(b"\x89PNG\r\n\x1a\n" + b"\0" * 32, ["PNG image"]),
                                           (b"\xff\xd8\xff\xe0" + b"\0" * 32, ["JPEG image"]),
                                           (b'{"a": 1}', ["JSON"]), (b"", ["empty"])])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, content, words):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    err = refused(run_cli("cvt-export", "--weights", str(path), "--out", str(tmp_path / "o")),
                  "not a PyTorch checkpoint", *words)
    assert "pickle" not in err


@pytest.mark.parametrize("source", ["models/cvt13.pth", "missing-dir/model.safetensors", "checkpoints/v2"])
def test_a_missing_local_checkpoint_is_not_a_network_error(tmp_path, source):
    (tmp_path / "models").mkdir()
    (tmp_path / "checkpoints").mkdir()
    err = refused(run_cli("cvt-export", "--weights", source, "--out", str(tmp_path / "o"), cwd=tmp_path),
                  "does not exist")
    assert "Hub" not in err and "network" not in err


def test_a_graph_whose_outputs_disagree_with_its_config_is_refused(demo_bundle, tmp_path):
    import onnx

    from cvt_deploy.util import CONFIG_KEY

    model = onnx.load(str(demo_bundle / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == CONFIG_KEY:
            cfg = json.loads(prop.value)
            cfg["num_classes"], cfg["labels"] = 5, [str(i) for i in range(5)]
            prop.value = json.dumps(cfg)
    onnx.save(model, str(tmp_path / "swapped.onnx"))
    refused(run_cli("cvt-predict", "--bundle", str(tmp_path / "swapped.onnx"), __file__),
            "5 classes", "do not belong together")


def test_huge_input_values_are_blamed_on_the_input_not_the_precision(demo_bundle):
    from cvt_deploy.backends import load

    runtime = load(demo_bundle, backend="onnxruntime")
    batch = np.full((1, 3, 64, 64), 3e38, np.float32)
    with pytest.raises(CvtDeployError) as e:
        runtime.predict(batch)
    assert "far outside" in e.value.message and "precision" not in e.value.message


@pytest.mark.parametrize("field,value,words", [("std", [0.0, 0.2, 0.2], "> 0"), ("std", [1e-6, 0.2, 0.2], "0.001"),
                                               ("mean", [123.675, 116.28, 103.53], "0..255"),
                                               ("std", [58.395, 57.12, 57.375], "0..255")])
def test_preprocessing_that_would_garble_every_image_is_refused(bundle_copy, field, value, words):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["model"]["preprocess"][field] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), __file__), "damaged", field, words)


@pytest.mark.parametrize("damage", [
    lambda m: m["batch"].update(min="one"),
    lambda m: m["batch"].update(min=0),
    lambda m: m.update(format_version="x"),
    lambda m: m["artifacts"].update({"onnx-fp32": "model.onnx"}),
    lambda m: m["artifacts"]["onnx-fp32"].update(sha256=7),
    lambda m: m["artifacts"]["onnx-fp32"].update(file="../../etc/passwd"),
    lambda m: m["model"].update(num_classes=-1),
    lambda m: m["model"].update(labels=["a"]),
    lambda m: m["model"].update(img_size="64"),
])
def test_damaged_manifest_values(bundle_copy, damage):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    damage(manifest)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), __file__), "manifest.json")


@pytest.mark.parametrize("ranges", [{"CLS": "TensorsData", "data": {"x": {"lowest": "low", "highest": 1.0}}},
                                    {"CLS": "TensorsData", "data": {"x": {"lowest": float("nan"), "highest": 1.0}}},
                                    {"CLS": "TensorsData", "data": {}}, "garbage"])
def test_a_damaged_calibration_cache_is_ignored_and_named(tmp_path, capsys, ranges):
    from cvt_deploy.export.int8 import CACHE_FORMAT, _read_cache

    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"format": CACHE_FORMAT, "version": 1, "key": "k", "ranges": ranges}))
    assert _read_cache(path, "k") is None
    err = capsys.readouterr().err
    assert str(path) in err and "calibrating again" in err
    path.write_text("{ truncated")
    assert _read_cache(path, "k") is None and str(path) in capsys.readouterr().err


@pytest.mark.parametrize("make, words", [
    (lambda x: x * 0 + np.linspace(0, 255, 64, dtype=np.float32), ["from 0 to 255", "never normalised"]),
    (lambda x: x * 10, ["far outside what this model's normalised images hold"]),
])
def test_a_float_batch_far_outside_the_normalised_range_is_refused(demo_bundle, make, words):
    """As a float image outside 0..1 is refused: a batch that was never normalised (0..255
    pixels), or was normalised twice over, gives confident nonsense, not an answer."""
    from conftest import rand_batch

    from cvt_deploy.backends import load

    runtime = load(demo_bundle, backend="onnxruntime")
    batch = rand_batch(2, seed=0)
    assert runtime.predict(batch).labels  # standard-normal values: what normalised images look like
    with pytest.raises(CvtDeployError) as e:
        runtime.predict(make(batch).astype(np.float32))
    for w in words:
        assert w in e.value.message, e.value.message
    assert "let preprocessing normalise them" in (e.value.hint or "")


def test_labels_and_names_with_terminal_control_characters_are_never_printed_raw(bundle_copy, tmp_path):
    hostile = ["\x1b[2J\x1b[Hwiped", "car\rriage", "bell\x07", "\u202etxt.exe", "tab\there"]
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    labels = manifest["model"]["labels"]
    manifest["model"]["labels"] = hostile + labels[len(hostile):]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    image = tmp_path / "digit\x1b[31m.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image, format="PNG")
    proc = run_cli("cvt-predict", "--bundle", str(bundle_copy), "--topk", "10", str(image))
    assert proc.returncode == 0, proc.stderr
    for raw in ("\x1b", "\r", "\x07", "\u202e", "\t"):
        assert raw not in proc.stdout + proc.stderr, repr(raw)
    for shown in ("\\x1b[2J\\x1b[Hwiped", "car\\rriage", "bell\\x07", "\\u202etxt.exe", "digit\\x1b[31m.png"):
        assert shown in proc.stdout, (shown, proc.stdout)
    as_json = json.loads(run_cli("cvt-predict", "--bundle", str(bundle_copy), "--topk", "10", "--json", str(image)).stdout)
    assert set(hostile) <= {t["label"] for item in as_json for t in item["top"]}  # data stays exact in JSON
    # and in error messages too
    refused(run_cli("cvt-predict", "--bundle", str(bundle_copy), str(tmp_path / "missing\x1b[2J.png")), "missing\\x1b[2J.png")
