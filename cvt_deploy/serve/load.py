"""Load a running Triton server: a concurrency sweep with tritonclient, and Triton's own metrics.

    >>> from cvt_deploy.serve.load import LoadOptions, sweep
    >>> result = sweep(LoadOptions(url="http://localhost:8000", model="cvt", concurrency=[1, 4, 16]))
    >>> print(result.table()); result.to_csv("served.csv")

Each level keeps C requests in flight (C threads, each with its own client, each sending its
next request as soon as the last one returned) for a block of time; levels are interleaved
over ``rounds`` like the in-process benchmark, so drifting load on a shared machine hits each
level alike. Throughput is images completed / wall time of the blocks (not batch / p50: with
requests in flight those differ). Triton's metrics, read before and after each block, give the
batch sizes the server formed (inferences / executions). With ``bundle`` the same rounds also
time that bundle in this process (``Runtime.run`` at ``batches``): the in-process rows the
served figures are compared with.
"""
from __future__ import annotations

import functools
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from ..errors import CvtDeployError, require
from .protocol import DEFAULT_MODEL_NAME, IMAGES, PIXELS, request_inputs

if TYPE_CHECKING:
    from ..bench.timing import TimingOptions

PROTOCOLS = ("http", "grpc")


@dataclass(frozen=True)
class Metrics:
    """Triton's cumulative counters for one model (all versions)."""

    requests: int     # nv_inference_request_success
    failures: int     # nv_inference_request_failure
    inferences: int   # nv_inference_count: images (batch items)
    executions: int   # nv_inference_exec_count: model executions, i.e. batches formed


def read_metrics(url: str, model: str) -> Metrics:
    """Triton's Prometheus counters for ``model`` from its metrics URL (http://host:8002/metrics)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as e:
        raise CvtDeployError(f"cannot read Triton's metrics at {url}: {e}",
                             "pass the server's metrics URL (--metrics-url http://HOST:8002/metrics)") from None
    totals = dict.fromkeys(("nv_inference_request_success", "nv_inference_request_failure",
                            "nv_inference_count", "nv_inference_exec_count"), 0.0)
    pattern = re.compile(r'^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$')
    for line in text.splitlines():
        m = pattern.match(line.strip())
        if m and m.group(1) in totals and f'model="{model}"' in m.group(2):
            totals[m.group(1)] += float(m.group(3))
    values = [int(v) for v in totals.values()]
    return Metrics(*values)


@dataclass(frozen=True)
class LoadOptions:
    """What to send where, and how long: one object for ``cvt-bench --url`` and :func:`sweep`.

    ``url``: the server's HTTP (http://host:8000) or gRPC (host:8001, with ``protocol="grpc"``)
    endpoint. ``metrics_url``: default the same host, port 8002. ``send``: "pixels" (preprocessed
    float32, what in-process ``run`` times) or "images" (encoded files, ``image`` or a demo
    digit; preprocessing then runs on the server). ``images_per_request``: batch of one request.
    ``min_time``, ``warmup``, ``rounds``, ``settle``, ``threads``: the timing the in-process
    benchmark shares (:class:`~cvt_deploy.bench.timing.TimingOptions`, held as ``timing``).
    """

    url: str
    model: str = DEFAULT_MODEL_NAME
    concurrency: Sequence[int] = (1, 2, 4, 8, 16)
    protocol: str = "http"
    metrics_url: str | None = None
    send: str = "pixels"
    image: str | None = None
    images_per_request: int = 1
    min_time: float = 2.0
    warmup: int = 3
    rounds: int = 5
    bundle: str | None = None
    batches: Sequence[int] = (1, 8, 32)
    threads: int | None = None
    settle: int = 1
    timing: TimingOptions = field(init=False, repr=False, compare=False)  # built from the fields above

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise CvtDeployError(f"unknown protocol {self.protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
        if self.send not in (PIXELS, IMAGES):
            raise CvtDeployError(f"--send {self.send!r}", f"use {PIXELS} or {IMAGES}")
        levels = list(dict.fromkeys(self.concurrency))
        if not levels or min(levels) < 1:
            raise CvtDeployError(f"--concurrency {list(self.concurrency)}: levels must be whole numbers >= 1",
                                 "e.g. --concurrency 1,2,4,8,16")
        object.__setattr__(self, "concurrency", levels)
        from ..bench.timing import TimingOptions, check_settings

        check_settings([("--images-per-request", self.images_per_request, 1)])
        object.__setattr__(self, "timing", TimingOptions(min_time=self.min_time, warmup=self.warmup, rounds=self.rounds,
                                                         settle=self.settle, threads=self.threads))

    @classmethod
    def with_timing(cls, timing: TimingOptions, **fields: Any) -> LoadOptions:
        """The options with ``timing``'s fields (``cvt-bench`` builds one for the benchmark and the load test)."""
        return cls(**timing.fields(), **fields)

    @property
    def endpoint(self) -> str:
        """host:port as tritonclient wants it."""
        parts = urlsplit(self.url if "//" in self.url else f"//{self.url}")
        if not parts.hostname:
            raise CvtDeployError(f"--url {self.url!r} names no host", "use e.g. --url http://localhost:8000")
        return f"{parts.hostname}:{parts.port or (8000 if self.protocol == 'http' else 8001)}"

    @property
    def metrics(self) -> str:
        if self.metrics_url:
            return self.metrics_url
        return f"http://{self.endpoint.rsplit(':', 1)[0]}:8002/metrics"


def _client_module(protocol: str) -> Any:
    require("tritonclient", "serve", "Load-testing a Triton server")
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _model_input(client: Any, options: LoadOptions) -> tuple[list[int], Any]:
    """The served model's pixel dims (C, H, W), from its metadata; a clear error when it is not served."""
    from tritonclient.utils import InferenceServerException

    try:
        meta = client.get_model_metadata(options.model)
    except InferenceServerException as e:
        raise CvtDeployError(f"the server at {options.url} does not serve model {options.model!r}: {e.message()}",
                             "check --url and --model-name (cvt-serve prints both at startup)") from None
    except Exception as e:  # connection refused, DNS...: tritonclient raises several types
        raise CvtDeployError(f"cannot reach a Triton server at {options.url} ({type(e).__name__}: {e})",
                             "start one with cvt-serve, or pass its --url") from None
    inputs = meta["inputs"] if isinstance(meta, dict) else [{"name": t.name, "shape": list(t.shape)} for t in meta.inputs]
    pixels = next((t for t in inputs if t["name"] == PIXELS), None)
    if pixels is None:
        raise CvtDeployError(f"model {options.model!r} has no {PIXELS!r} input: it was not served by cvt-serve",
                             "load-test a model served with cvt-serve")
    return [int(d) for d in pixels["shape"][1:]], meta


def _payload(options: LoadOptions, chw: list[int]) -> dict[str, Any]:
    n = options.images_per_request
    if options.send == IMAGES:
        from ..demo import DEMO_SAMPLES

        path = options.image or next(iter(sorted(DEMO_SAMPLES.glob("*.png"))))
        with open(path, "rb") as f:
            return {"images": [f.read()] * n}
    return {"pixels": np.random.default_rng(0).standard_normal((n, *chw)).astype(np.float32)}


@dataclass
class _Level:
    concurrency: int
    times: list[float] = field(default_factory=list)
    images: int = 0
    wall: float = 0.0
    inferences: int = 0
    executions: int = 0
    errors: list[str] = field(default_factory=list)


def _run_block(level: _Level, connect: Callable[[], Any], send: Callable[[Any], None], seconds: float,
               metrics: Callable[[], Metrics], images_per_request: int, settle: int = 1) -> None:
    """C requests in flight for ``seconds``; latencies, images and Triton's counters into ``level``."""
    marks: dict[str, Any] = {}

    def start() -> None:  # runs once, when every thread has settled, before any timed request
        marks["before"] = metrics()
        marks["t0"] = time.perf_counter()

    barrier = threading.Barrier(level.concurrency, action=start)

    def worker() -> None:
        try:
            # a client per thread: tritonclient.http's clients are bound to the thread (gevent) that made them
            client = connect()
            for _ in range(settle):  # the first call after a pause pays for waking the server's threads
                send(client)
            barrier.wait()
            end = marks["t0"] + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                send(client)
                level.times.append(time.perf_counter() - t)
        except Exception as e:  # report it in the row; the other levels go on
            level.errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
            barrier.abort()

    n_before = len(level.times)
    threads = [threading.Thread(target=worker) for _ in range(level.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if level.errors:
        return
    level.wall += time.perf_counter() - marks["t0"]
    level.images += (len(level.times) - n_before) * images_per_request
    after = metrics()
    level.inferences += after.inferences - marks["before"].inferences
    level.executions += after.executions - marks["before"].executions


def sweep(options: LoadOptions, progress: bool = True) -> Any:
    """A :class:`~cvt_deploy.bench.BenchResult`: one row per concurrency level (and per in-process batch)."""
    from ..bench.results import BenchResult, BenchRow
    from ..bench.timing import summarize
    from ..progress import track

    module = _client_module(options.protocol)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    chw, _ = _model_input(module.InferenceServerClient(options.endpoint), options)
    payload = _payload(options, chw)
    read = lambda: read_metrics(options.metrics, options.model)  # noqa: E731
    read()  # a wrong metrics URL fails now, not after the first block

    def send(client: Any) -> None:
        client.infer(options.model, request_inputs(module, **payload))  # an error status raises: a failure

    levels = [_Level(c) for c in options.concurrency]
    connect = lambda: module.InferenceServerClient(options.endpoint)  # noqa: E731
    timing = options.timing
    warm = connect()
    for _ in range(timing.warmup):
        send(warm)
    local = _local_cases(options, chw) if options.bundle else []
    block = timing.min_time / timing.rounds
    schedule = [(r, item) for r in range(timing.rounds) for item in [*levels, *local]]
    for _, item in track(schedule, len(schedule), "measuring", show=progress):
        if isinstance(item, _Level):
            if not item.errors:
                _run_block(item, connect, send, block, read, options.images_per_request, timing.settle)
        else:
            _time_block(item, block, timing.settle)

    host = options.endpoint
    backend = f"triton-{options.protocol}"
    rows = []
    for lv in levels:
        row = BenchRow(options.model, backend, "", options.images_per_request, "server", timing.threads or 0,
                       concurrency=lv.concurrency)
        if lv.errors or not lv.times:
            row.status, row.reason = "failed", lv.errors[0] if lv.errors else "no request completed"
        else:
            _fill(row, summarize(lv.times))
            row.throughput_ips = round(lv.images / lv.wall, 3)
            row.server_batch = round(lv.inferences / lv.executions, 2) if lv.executions else None
        rows.append(row)
    meta: dict[str, Any] = {"url": options.url, "endpoint": host, "model": options.model, "protocol": options.protocol,
                            "metrics_url": options.metrics, "send": options.send,
                            "images_per_request": options.images_per_request, "rounds": timing.rounds,
                            "min_time_s": timing.min_time, "started": started,
                            "timing": "per-request time.perf_counter around client.infer, C threads in flight; "
                                      "throughput = images completed / block wall time; server_batch = Triton's "
                                      "nv_inference_count / nv_inference_exec_count over the blocks"}
    if local:
        rows += _local_rows(local, options, meta)
    return BenchResult(rows, meta)


def _fill(row: Any, s: Any) -> None:
    row.p50_ms, row.p90_ms, row.p99_ms, row.mean_ms, row.min_ms, row.max_ms = (
        round(v, 4) for v in (s.p50, s.p90, s.p99, s.mean, s.min, s.max))
    row.iterations = s.n


def _local_cases(options: LoadOptions, chw: list[int]) -> list[Any]:
    """In-process cases of the bundle at ``batches`` on ONNX Runtime, warmed up, to time beside the server."""
    from ..bench.timing import Case
    from ..backends import load

    assert options.bundle is not None
    runtime = load(options.bundle, "onnxruntime", "cpu", "fp32", options.timing.threads)
    cases = []
    for b in options.batches:
        x = np.random.default_rng(b).standard_normal((b, *chw)).astype(np.float32)
        case = Case(f"in-process b{b}", functools.partial(runtime.run, x))
        case.runtime = runtime  # type: ignore[attr-defined]  # kept alive with the case
        for _ in range(max(1, options.timing.warmup)):
            case._once()
        cases.append(case)
    return cases


def _time_block(case: Any, seconds: float, settle: int = 1) -> None:
    for _ in range(settle):  # ORT's threads spin after a call, and the server just had the cores
        case._once()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        case.times.append(case._once())


def _local_rows(cases: list[Any], options: LoadOptions, meta: dict[str, Any]) -> list[Any]:
    from ..bench.results import BenchRow
    from ..bench.timing import summarize

    rows = []
    variant = cases[0].runtime.config.variant
    for case, b in zip(cases, options.batches):
        row = BenchRow(variant, "onnxruntime", "fp32", b, "cpu", options.timing.threads or 0, role="in-process")
        s = summarize(case.times)
        _fill(row, s)
        # images / wall time, as the served rows: batch / p50 would flatter the side with the heavier tail
        row.throughput_ips = round(b * len(case.times) / sum(case.times), 3)
        rows.append(row)
    meta["bundle"] = options.bundle
    return rows


def comparison(result: Any) -> dict[str, float] | None:
    """Served vs in-process, when both were timed in one run: best throughput ratio and p50 ratio at 1."""
    served = [r for r in result.measured if r.concurrency is not None]
    local = [r for r in result.measured if r.role == "in-process"]
    if not served or not local:
        return None
    out = {"throughput_best_served_vs_in_process": round(max(r.throughput_ips for r in served)
                                                         / max(r.throughput_ips for r in local), 3)}
    c1 = next((r for r in served if r.concurrency == 1), None)
    b1 = next((r for r in local if r.batch == 1), None)
    if c1 is not None and b1 is not None:
        out["p50_served_c1_vs_in_process_b1"] = round(c1.p50_ms / b1.p50_ms, 3)
    return out
