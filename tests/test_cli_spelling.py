"""One spelling per idea across the commands, and the older spellings still accepted.

Every command runs in-process (``main([...])``) with the library call it would make next
replaced by a recorder that stops the command (``Stop``, exit code 2): each test sees exactly
what the command hands the library, without exporting, loading or measuring anything.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from cvt_deploy.cli import bench, check, common, demo, export, predict, serve
from cvt_deploy.errors import CvtDeployError
from cvt_deploy.util import BatchRange

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "cvt-export": export.build_parser, "cvt-check": check.build_parser, "cvt-predict": predict.build_parser,
    "cvt-bench": bench.build_parser, "cvt-serve": serve.build_parser, "cvt-demo": demo.build_parser,
}
MAINS: dict[str, Callable[[list[str]], int]] = {
    "cvt-export": export.main, "cvt-check": check.main, "cvt-predict": predict.main,
    "cvt-bench": bench.main, "cvt-serve": serve.main, "cvt-demo": demo.main,
}

# idea -> (its one spelling, the argparse dest, the commands that take it)
IDEAS: dict[str, tuple[list[str], str, set[str]]] = {
    "precision": (["--precision"], "precision", set(PARSERS)),
    "backend": (["--backend"], "backend", {"cvt-check", "cvt-predict", "cvt-bench", "cvt-serve"}),
    "batch sizes": (["--batch"], "batch", {"cvt-bench"}),
    "graph batch range": (["--batch-range"], "batch_range", {"cvt-export"}),
    "image limit": (["--limit"], "limit", {"cvt-export", "cvt-check"}),
    "quiet": (["-q", "--quiet"], "quiet", {"cvt-export", "cvt-check", "cvt-predict", "cvt-bench", "cvt-demo"}),
    "json": (["--json"], "json", {"cvt-export", "cvt-check", "cvt-predict", "cvt-bench"}),
    "architecture variant": (["--model"], "model", {"cvt-export"}),
    "served model name": (["--model-name"], "model_name", {"cvt-bench", "cvt-serve"}),
    "bundle": (["--bundle"], "bundle", set(PARSERS) - {"cvt-demo"}),
}
SEVERAL = {"precision": {"cvt-export", "cvt-check", "cvt-bench", "cvt-demo"}, "backend": {"cvt-check", "cvt-bench"}}
OLD = {"--precisions", "--backends", "--batches", "--check-limit", "--no-progress", "--csv", "--onnx"}


MODEL = object()  # what the recorders load: one object, so that two runs' records compare equal


class Stop(CvtDeployError):
    """Raised by the recorders: the command got as far as the library call."""


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_warned", set())  # once per process: each test is a fresh "process"


Record = Callable[..., dict[str, Any]]


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Record:
    """``record(command, argv)``: what the command passed to the library (and nothing was run);
    ``reach=False``: the command must stop (exit 2) before it calls the library."""
    import cvt_deploy.bench
    import cvt_deploy.checkpoints
    import cvt_deploy.export.pipeline
    import cvt_deploy.parity
    import cvt_deploy.backends
    import cvt_deploy.serve.load
    import cvt_deploy.serve.server
    import cvt_deploy.trt.loader
    import cvt_deploy.trt.readiness
    from cvt_deploy.bundle import Bundle

    seen: dict[str, Any] = {}

    def recorder(*names: str) -> Callable[..., Any]:
        def fake(*args: Any, **kw: Any) -> Any:
            seen.update(zip(names, args), **kw, _reached=True)
            raise Stop("stopped by the test")
        return fake

    monkeypatch.setattr(Bundle, "open", staticmethod(lambda path: seen.setdefault("bundle_path", Path(path))))
    monkeypatch.setattr(export, "load_model_from_args", lambda args: (MODEL, "test"))
    monkeypatch.setattr(cvt_deploy.export.pipeline, "export_bundle", recorder("model", "out", "options"))
    monkeypatch.setattr(cvt_deploy.export.pipeline, "add_engines", recorder("bundle", "precisions", "build"))
    monkeypatch.setattr(cvt_deploy.parity, "check_bundle", recorder("bundle"))
    monkeypatch.setattr(cvt_deploy.trt.readiness, "check_bundle_readiness", recorder("bundle", "versions", "precisions"))
    monkeypatch.setattr(cvt_deploy.backends, "load", recorder("bundle"))
    monkeypatch.setattr(cvt_deploy.bench, "benchmark", recorder("bundle"))
    monkeypatch.setattr(cvt_deploy.bench, "check_batches", lambda bundle, batches: None)  # the bundle is a path here
    monkeypatch.setattr(cvt_deploy.serve.load, "sweep", recorder("options"))
    monkeypatch.setattr(cvt_deploy.serve.server, "Server", recorder("bundle", "options"))
    monkeypatch.setattr(cvt_deploy.checkpoints, "load_checkpoint", lambda *a, **kw: MODEL)
    monkeypatch.setattr(serve.logging, "basicConfig", lambda **kw: None)  # leave the test process's logging alone

    base = {"cvt-export": ["--out", str(tmp_path / "out")], "cvt-check": ["--bundle", "b"],
            "cvt-predict": ["--bundle", "b", "x.png"], "cvt-bench": ["--bundle", "b"],
            "cvt-serve": ["--bundle", "b", "--log-file", str(tmp_path / "triton.log")],
            "cvt-demo": ["--out", str(tmp_path / "demo"), "--no-bench"]}

    def run(command: str, argv: list[str], reach: bool = True) -> dict[str, Any]:
        seen.clear()
        assert MAINS[command]([*base[command], *argv]) == 2
        assert seen.pop("_reached", False) == reach, f"{command} {argv}: reached the library: {not reach}"
        return dict(seen)

    return run


def visible(ap: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in ap._actions if a.help is not argparse.SUPPRESS]


# --- one spelling per idea, read off the parsers ----------------------------------------------

def test_every_idea_has_one_spelling_across_commands() -> None:
    table: dict[str, dict[str, list[str]]] = {idea: {} for idea in IDEAS}
    for command, build in PARSERS.items():
        ap = build()
        for action in visible(ap):
            assert not OLD & set(action.option_strings), f"{command} shows an old spelling {action.option_strings}"
            for idea, (spelling, dest, _) in IDEAS.items():
                if action.dest == dest or set(spelling) & set(action.option_strings):
                    table[idea][command] = action.option_strings
        for action in ap._actions:
            if action.help is argparse.SUPPRESS:  # every hidden option is an alias of a shown one
                assert isinstance(action, common.DeprecatedAlias), (command, action.option_strings)
                assert action.target in visible(ap) and action.dest == action.target.dest
    for idea, (spelling, _, commands) in IDEAS.items():
        assert table[idea] == {c: spelling for c in commands}, idea
    for idea, several in SEVERAL.items():
        for command in IDEAS[idea][2]:
            action = PARSERS[command]()._option_string_actions[IDEAS[idea][0][0]]
            assert isinstance(action, common.ListOption) and action.many == (command in several), (idea, command)
    # --json is a flag everywhere (cvt-bench's optional FILE is only the older spelling)
    for command in IDEAS["json"][2]:
        args = PARSERS[command]().parse_args([*(["--bundle", "b"] if command != "cvt-export" else []), "--json",
                                              *(["x.png"] if command == "cvt-predict" else [])])
        assert args.json is True, command


def test_help_shows_the_new_spellings_and_names_the_old_ones_once() -> None:
    for command, build in PARSERS.items():
        text = build().format_help()
        options, _, note = text.partition("older spellings, still accepted with a warning:")
        for old in OLD:
            assert f"{old} " not in options and f"{old}\n" not in options, (command, old)
        for alias in (a for a in build()._actions if isinstance(a, common.DeprecatedAlias)):
            assert f"({alias.new_usage or alias.new})" in note, (command, alias.option_strings)
    assert "--json FILE (--save FILE.json)" in bench.build_parser().format_help()


# --- each new spelling reaches the library; each old one does the same, warning once ------------

RENAMED = [  # command, new argv, old argv, the warning's "use ...", check on what the library got
    ("cvt-bench", ["--precision", "fp16,int8"], ["--precisions", "fp16,int8"], "--precision",
     lambda s: s["options"].precisions == ["fp16", "int8"]),
    ("cvt-bench", ["--backend", "onnxruntime,torch"], ["--backends", "onnxruntime,torch"], "--backend",
     lambda s: s["options"].backends == ["onnxruntime", "torch"]),
    ("cvt-bench", ["--batch", "1,8"], ["--batches", "1,8"], "--batch", lambda s: s["options"].batches == [1, 8]),
    ("cvt-bench", ["--quiet"], ["--no-progress"], "--quiet", lambda s: s["progress"] is False),
    ("cvt-bench", ["--url", "http://h:8000", "--model-name", "m"], ["--url", "http://h:8000", "--model", "m"],
     "--model-name", lambda s: s["options"].model == "m"),
    ("cvt-export", ["--batch-range", "2"], ["--batch", "2"], "--batch-range",
     lambda s: s["options"].batch == BatchRange(2, 2, 2)),
    ("cvt-export", ["--limit", "7"], ["--check-limit", "7"], "--limit", lambda s: s["options"].check_limit == 7),
    ("cvt-export", ["--format", "trt", "--bundle", "old-b"], ["--format", "trt", "--onnx", "old-b"], "--bundle",
     lambda s: s["bundle_path"] == Path("old-b")),
    ("cvt-demo", ["--precision", "fp16", "-q"], ["--precisions", "fp16", "-q"], "--precision",
     lambda s: list(s["precisions"]) == ["fp16"] and s["progress"] is False),
]


@pytest.mark.parametrize("command, new, old, use, check_seen", RENAMED,
                         ids=[f"{r[0]} {next(a for a in r[2] if a not in r[1])}" for r in RENAMED])
def test_new_and_old_spellings_do_the_same_and_the_old_one_warns_once(
        record: Record, capsys: pytest.CaptureFixture[str],
        command: str, new: list[str], old: list[str], use: str, check_seen: Callable[[dict[str, Any]], bool]) -> None:
    got_new = record(command, new)
    err = capsys.readouterr().err
    assert check_seen(got_new) and "warning:" not in err, err
    got_old = [record(command, old) for _ in range(2)]  # twice in one process: warned once
    err = capsys.readouterr().err
    flag = next(a for a in old if a.startswith("--") and a not in new)
    assert check_seen(got_old[0]) and check_seen(got_old[1])
    assert err.count("warning:") == 1 and f"warning: {flag} is deprecated; use {use}" in err, err


SAME = [  # command, comma list, repeated: the same to the library
    ("cvt-bench", ["--precision", "fp32,int8"], ["--precision", "fp32", "--precision", "int8"], "options"),
    ("cvt-bench", ["--batch", "1,8,32"], ["--batch", "1", "--batch", "8,32"], "options"),
    ("cvt-bench", ["--backend", "onnxruntime,torch"], ["--backend", "onnxruntime", "--backend", "torch"], "options"),
    ("cvt-bench", ["--url", "h:8000", "--concurrency", "1,4"], ["--url", "h:8000", "--concurrency", "1",
                                                                 "--concurrency", "4"], "options"),
    ("cvt-export", ["--precision", "fp16,int8"], ["--precision", "fp16", "--precision", "int8"], "options"),
    ("cvt-check", ["--precision", "fp16,int8", "--backend", "onnxruntime,tensorrt"],
     ["--precision", "fp16", "--precision", "int8", "--backend", "onnxruntime", "--backend", "tensorrt"], None),
    ("cvt-check", ["--tensorrt", "8.5,10"], ["--tensorrt", "8.5", "--tensorrt", "10"], None),
    ("cvt-demo", ["--precision", "fp32,int8"], ["--precision", "fp32", "--precision", "int8"], None),
]


@pytest.mark.parametrize("command, comma, repeated, key", SAME)
def test_a_comma_list_and_repetition_are_the_same(record: Record, command: str,
                                                  comma: list[str], repeated: list[str], key: str | None) -> None:
    a, b = record(command, comma), record(command, repeated)
    a.pop("bundle", None), b.pop("bundle", None)
    assert a == b
    values = a[key] if key else a
    assert values  # something was passed on, and it is the same both ways


def test_what_check_predict_and_serve_pass_on(record: Record) -> None:
    got = record("cvt-check", ["--precision", "int8,fp16", "--backend", "tensorrt", "--limit", "9", "-q"])
    assert (got["precisions"], got["backends"], got["limit"], got["progress"]) == (["int8", "fp16"], ["tensorrt"], 9,
                                                                                   False)
    assert record("cvt-check", [])["backends"] == ["onnxruntime"] and record("cvt-check", [])["precisions"] is None
    got = record("cvt-check", ["--tensorrt", "10,8.5", "--tensorrt", "10"])
    assert list(got["versions"]) == ["10", "8.5"]
    got = record("cvt-predict", ["--precision", "int8", "--backend", "onnxruntime"])
    assert (got["precision"], got["backend"]) == ("int8", "onnxruntime")
    got = record("cvt-serve", ["--precision", "fp16", "--backend", "torch", "--model-name", "m"])["options"]
    assert (got.precision, got.backend, got.model_name) == ("fp16", "torch", "m")
    got = record("cvt-export", ["-q"])
    assert got["options"].precisions == ("fp32",) and got["progress"] is False and got["options"].check_limit is None
    assert record("cvt-demo", [])["precisions"] == ["fp32", "fp16", "int8"]


# --- bad values: one clear message, exit 2, nothing run -----------------------------------------

BAD = [
    ("cvt-export", ["--precision", "fp16,fp64"], "--precision 'fp16,fp64': unknown precision 'fp64'", "fp32, fp16, int8"),
    ("cvt-check", ["--precision", "fp8"], "unknown precision 'fp8'", "fp32, fp16, int8"),
    ("cvt-check", ["--backend", "torch"], "unknown backend 'torch'", "tensorrt, tensorrt-rtx, onnxruntime"),
    ("cvt-check", ["--tensorrt", "8.5,9"], "unknown TensorRT version '9'", "8.5, 8.6, 10"),
    ("cvt-predict", ["--precision", "fp16,int8"], "--precision 'fp16,int8': takes one precision", "fp32, fp16, int8"),
    ("cvt-predict", ["--backend", "ort"], "unknown backend 'ort'", "tensorrt, tensorrt-rtx, onnxruntime, openvino, torch"),
    ("cvt-serve", ["--precision", "bf16"], "unknown precision 'bf16'", "fp32, fp16, int8"),
    ("cvt-bench", ["--precisions", "fp64"], "--precisions 'fp64': unknown precision 'fp64'", "--precision fp16,int8"),
    ("cvt-bench", ["--batch", "1,x"], "--batch '1,x': 'x' is not a whole number", "--batch 1,8,32"),
    ("cvt-bench", ["--url", "h:8000", "--concurrency", "four"], "'four' is not a whole number", "--concurrency"),
    ("cvt-bench", ["--save", "bench.txt"], "--save bench.txt: unknown file type .txt", "FILE.json"),
    ("cvt-bench", ["--save", "bench"], "unknown file type (none)", "FILE.csv"),
    ("cvt-demo", ["--precision", "int4"], "unknown precision 'int4'", "fp32, fp16, int8"),
]


@pytest.mark.parametrize("command, argv, message, fix", BAD)
def test_bad_values_are_named_with_the_valid_ones(record: Record,
                                                  capsys: pytest.CaptureFixture[str], command: str, argv: list[str],
                                                  message: str, fix: str) -> None:
    record(command, argv, reach=False)
    err = capsys.readouterr().err
    assert "error: " in err and message in err.split("fix: ", 1)[0] and fix in err.split("fix: ", 1)[1], err
    assert "Traceback" not in err and "usage:" not in err


# --- cvt-bench's outputs: --json on stdout, --save FILE.json/.csv, the older --json FILE / --csv FILE

@pytest.fixture
def fake_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    import cvt_deploy.bench
    from cvt_deploy.bench import BenchResult, BenchRow
    from cvt_deploy.bundle import Bundle

    row = BenchRow("cvt-tiny", "onnxruntime", "fp32", 1, "cpu", 1, p50_ms=1.5, iterations=3)
    meta = {"url": "-", "model": "cvt-tiny", "protocol": "-", "send": "-", "images_per_request": 1}  # what header() reads
    monkeypatch.setattr(Bundle, "open", staticmethod(lambda path: path))
    monkeypatch.setattr(cvt_deploy.bench, "check_batches", lambda bundle, batches: None)
    monkeypatch.setattr(cvt_deploy.bench, "benchmark", lambda bundle, options, progress: BenchResult([row], meta))


def test_bench_json_prints_the_result_and_save_writes_files(fake_benchmark: None, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.bench import BenchResult

    saved_json, saved_csv = tmp_path / "b.json", tmp_path / "b.csv"
    assert bench.main(["--bundle", "b", "--json", "--save", str(saved_json), "--save", str(saved_csv), "-q"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # stdout is the JSON and nothing else
    assert data["rows"][0]["backend"] == "onnxruntime" and data["meta"]["model"] == "cvt-tiny"
    assert BenchResult.from_json(saved_json).rows[0].p50_ms == 1.5
    assert saved_csv.read_text().startswith("model,backend,precision,batch")
    assert "warning" not in err and f"wrote {saved_json}" in err

    assert bench.main(["--bundle", "b", "-q"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and not out.lstrip().startswith("{")  # without --json: the table


def test_bench_older_json_file_and_csv_file_still_write_them(fake_benchmark: None, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_deploy.bench import BenchResult

    old_json, old_csv = tmp_path / "old.json", tmp_path / "old.out"  # --csv FILE was CSV whatever the suffix
    assert bench.main(["--bundle", "b", "--json", str(old_json), "--csv", str(old_csv), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "onnxruntime" in out and not out.lstrip().startswith("{")  # the table: --json FILE is not the flag
    assert BenchResult.from_json(old_json).rows[0].backend == "onnxruntime"
    assert old_csv.read_text().startswith("model,backend")
    assert "warning: --json FILE is deprecated; use --save FILE" in err
    assert "warning: --csv FILE is deprecated; use --save FILE.csv" in err
    assert "warning: --no-progress is deprecated; use --quiet" in err


def test_bench_bad_save_is_refused_before_measuring(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import cvt_deploy.bench

    monkeypatch.setattr(cvt_deploy.bench, "benchmark", lambda *a, **kw: pytest.fail("measured"))
    assert bench.main(["--bundle", "b", "--save", "bench.png", "--save", "ok.json"]) == 2
    err = capsys.readouterr().err
    assert "error: --save bench.png: unknown file type .png" in err and "--plot FILE.png" in err
