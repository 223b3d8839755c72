"""One timing-options type for the in-process benchmark and the load test of a server, and the
graph-facts object a TensorRT build takes: both validated or normalised in one place."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cvt_deploy.bench import BenchOptions
from cvt_deploy.bench.timing import TimingOptions
from cvt_deploy.errors import CvtDeployError
from cvt_deploy.serve.load import LoadOptions
from cvt_deploy.trt.builder import PlanSource
from cvt_deploy.util import BatchRange


def test_bench_and_load_options_hold_the_same_timing() -> None:
    timing = TimingOptions(min_time=0.5, warmup=1, rounds=2, threads=3)
    bench = BenchOptions.with_timing(timing, backends=["onnxruntime"], matmul_size=64)
    load = LoadOptions.with_timing(timing, url="http://localhost:8000")
    assert bench.timing == load.timing == timing
    assert (bench.min_time, bench.warmup, bench.rounds, bench.settle, bench.threads) == (0.5, 1, 2, 1, 3)
    # the flat keywords still build it, and a replaced field rebuilds it
    assert BenchOptions(threads=2, warmup=0).timing == TimingOptions(warmup=0, threads=2)
    assert dataclasses.replace(bench, rounds=4).timing.rounds == 4
    assert LoadOptions(url="h:8001", protocol="grpc", min_time=1.0).timing == TimingOptions(min_time=1.0)


@pytest.mark.parametrize("fields, message", [
    ({"threads": 0}, "--threads 0 is below 1"),
    ({"rounds": 0}, "--rounds 0 is below 1"),
    ({"warmup": -1}, "--warmup -1 is below 0"),
    ({"settle": -1}, "--settle -1 is below 0"),
    ({"min_time": 0.0}, "--min-time 0 must be positive"),
])
def test_timing_is_refused_alike_for_the_benchmark_and_the_load_test(fields: dict[str, float], message: str) -> None:
    for make in (lambda: TimingOptions(**fields), lambda: BenchOptions(**fields),  # type: ignore[arg-type]
                 lambda: LoadOptions(url="http://localhost:8000", **fields)):  # type: ignore[arg-type]
        with pytest.raises(CvtDeployError) as e:
            make()
        assert e.value.message == message


def test_what_only_the_benchmark_or_the_load_test_has_is_still_checked_there() -> None:
    with pytest.raises(CvtDeployError, match="--iterations 0 is below 1"):
        BenchOptions(iterations=0)
    with pytest.raises(CvtDeployError, match="--matmul-size 8 is below 16"):
        BenchOptions(matmul_size=8)
    with pytest.raises(CvtDeployError, match="--images-per-request 0 is below 1"):
        LoadOptions(url="http://localhost:8000", images_per_request=0)


def test_a_plan_source_normalises_what_callers_pass() -> None:
    source = PlanSource("g/model.onnx", "fp16", BatchRange(1, 2, 4), None, (3, 64, 64),  # type: ignore[arg-type]
                        fp32_nodes=["a", "b"])
    assert source.onnx_path == Path("g/model.onnx") and source.fp32_nodes == ("a", "b")
    assert source.onnx_sha256 is None and hash(source)  # frozen: one build's facts
