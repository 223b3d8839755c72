"""cvt-serve on a real Triton server (PyTriton's tritonserver, our Python-backend model), talked to
with tritonclient over HTTP and gRPC.

One server for the module (starting Triton takes seconds); it binds free loopback ports and is
stopped by process id. The last test stops it with SIGTERM and checks that Triton and its
Python-backend stub are gone and the ports are free again.
"""
from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving needs the 'serve' extra: pip install 'cvt-deploy[serve]'")
pytest.importorskip("tritonclient.http", reason="serving tests need tritonclient: pip install 'cvt-deploy[serve]'")

from conftest import cpu_load  # noqa: E402
from cvt_deploy.errors import CvtDeployError  # noqa: E402
from cvt_deploy.serve.load import Metrics  # noqa: E402
from cvt_deploy.serve.protocol import request_inputs  # noqa: E402

#: The error status of a bad request: HTTP 400, gRPC INVALID_ARGUMENT (what tritonclient's .status() says).
BAD_REQUEST = {"tritonclient.http": "400", "tritonclient.grpc": "StatusCode.INVALID_ARGUMENT"}

SAMPLES = sorted((Path(__file__).parents[1] / "cvt_deploy" / "demo" / "samples").glob("*.png"))
READY_TIMEOUT_S = 180


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports the kernel says are free now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    """Nothing listens on the port and a new server could bind it (SO_REUSEADDR, as servers bind:
    connections the tests made may still sit in TIME_WAIT)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class Served:
    proc: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    ports: list[int]
    output: list[str] = field(default_factory=list)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM by pid; if it does not exit, SIGKILL its process group (it leads its own session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def served(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "triton.log"
    cmd = [sys.executable, "-m", "cvt_deploy.cli.serve", "--bundle", str(demo_bundle), "--host", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1",
           "--max-queue-delay-us", "20000", "--log-file", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server = Served(proc, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics",
                    [http, grpc, metrics])
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.output.append(line)
            if line.startswith("ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            log_text = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail("cvt-serve did not become ready:\n" + "".join(server.output) + log_text)
    try:
        yield server
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def reference(demo_bundle: Path):
    """In-process predict of the sample images on the runtime the server uses."""
    import cvt_deploy
    from cvt_deploy.preprocess import preprocess

    runtime = cvt_deploy.load(demo_bundle, backend="onnxruntime", precision="fp32")
    files = [str(p) for p in SAMPLES[:6]]
    return runtime, files, runtime.predict(files), preprocess(files, runtime.config.preprocess)


def clients(served: Served):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    return [(thttp, thttp.InferenceServerClient(served.http)), (tgrpc, tgrpc.InferenceServerClient(served.grpc))]


def test_one_runtime_call_answers_requests_of_both_kinds(reference, monkeypatch):
    """What Triton hands the model: a list of requests; one run() for all, outputs split back per request."""
    from cvt_deploy.serve.server import Refusal, infer_batch

    runtime, files, pred, pixels = reference
    calls = []
    run = runtime.run
    monkeypatch.setattr(runtime, "run", lambda batch: calls.append(len(batch)) or run(batch))
    requests = [{"images": np.array([[Path(f).read_bytes()] for f in files[:2]], dtype=np.object_)},
                {"pixels": pixels[2:5]},
                {"images": np.array([[Path(files[5]).read_bytes()]], dtype=np.object_)}]
    out = infer_batch(runtime, requests, topk=3)
    assert calls == [6]
    logits = np.concatenate([o["logits"] for o in out])
    assert [len(o["logits"]) for o in out] == [2, 3, 1] and np.abs(logits - pred.logits).max() <= 1e-5
    np.testing.assert_array_equal(np.concatenate([o["classes"] for o in out]), pred.indices[:, :3])
    both = infer_batch(runtime, [{"images": requests[0]["images"], "pixels": pixels[:2]}], topk=3)
    assert isinstance(both[0], Refusal) and both[0].bad_request and "exactly one of the inputs" in both[0].message


def test_a_bad_request_in_a_batch_fails_alone(reference):
    """infer_batch refuses the bad request alone and answers the good ones in the same batch
    exactly as without it."""
    from cvt_deploy.serve.server import Refusal, infer_batch

    runtime, files, pred, pixels = reference
    nan = pixels[:1].copy()
    nan[0, 0, 0, 0] = np.nan
    requests = [{"images": np.array([[Path(files[0]).read_bytes()]], dtype=np.object_)},
                {"images": np.array([[b"not an image"], [Path(files[1]).read_bytes()]], dtype=np.object_)},
                {"pixels": pixels[2:4]},
                {"pixels": nan},
                {"images": np.zeros((0, 1), dtype=np.object_)},
                {"pixels": pixels[4:6] * 1000}]
    out = infer_batch(runtime, requests, topk=3)
    assert np.abs(out[0]["logits"] - pred.logits[:1]).max() <= 1e-5
    assert np.abs(out[2]["logits"] - pred.logits[2:4]).max() <= 1e-5
    for i, says in ((1, b"is not a readable image"), (3, b"NaN or infinite"), (4, b"no images"),
                    (5, b"far outside what this model's normalised images hold")):
        refusal = out[i]
        assert isinstance(refusal, Refusal) and refusal.bad_request, (i, refusal)
        assert says.decode() in refusal.message and "fix: " in refusal.message, refusal.message
        assert "Traceback" not in refusal.message and "/cvt_deploy/" not in refusal.message


def test_startup_prints_urls_and_metadata_describes_inputs_and_outputs(served):
    text = "".join(served.output)
    assert served.http in text and served.grpc in text and served.metrics in text
    for module, client in clients(served):
        meta = client.get_model_metadata("cvt")
        if not isinstance(meta, dict):  # gRPC: a protobuf message
            from google.protobuf.json_format import MessageToDict

            meta = MessageToDict(meta)
        inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
        outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
        assert inputs == {"images": ("BYTES", [-1, 1]), "pixels": ("FP32", [-1, 3, 64, 64])}, module.__name__
        assert outputs == {"logits": ("FP32", [-1, 10]), "classes": ("INT64", [-1, 5]),
                           "scores": ("FP32", [-1, 5]), "labels": ("BYTES", [-1, 5])}, module.__name__


def test_images_and_pixels_give_in_process_predictions(served, reference):
    runtime, files, pred, pixels = reference
    encoded = [Path(f).read_bytes() for f in files]
    for module, client in clients(served):
        for inputs in (request_inputs(module, images=encoded), request_inputs(module, pixels=pixels)):
            result = client.infer("cvt", inputs)
            logits = result.as_numpy("logits")
            assert logits.shape == pred.logits.shape
            assert np.abs(logits - pred.logits).max() <= 1e-5, module.__name__
            np.testing.assert_array_equal(result.as_numpy("classes"), pred.indices)
            np.testing.assert_allclose(result.as_numpy("scores"), pred.scores, atol=1e-6)
            assert [[b.decode() for b in row] for row in result.as_numpy("labels")] == pred.labels


def settled_metrics(url: str) -> Metrics:
    """Triton's counters for the model once they stop moving: a request just answered (an earlier
    test's) may be counted a moment after its reply (seen: 33 requests counted for 32 sent)."""
    from cvt_deploy.serve.load import read_metrics

    last = read_metrics(url, "cvt")
    for _ in range(40):
        time.sleep(0.05)
        now = read_metrics(url, "cvt")
        if now == last:
            return now
        last = now
    return last


def test_concurrent_requests_are_batched(served, reference):
    import tritonclient.http as thttp

    _, files, pred, _ = reference
    encoded = Path(files[0]).read_bytes()
    before = settled_metrics(served.metrics)
    client = thttp.InferenceServerClient(served.http, concurrency=32)
    pending = [client.async_infer("cvt", request_inputs(thttp, images=[encoded])) for _ in range(32)]
    results = [p.get_result() for p in pending]
    for r in results:
        assert np.abs(r.as_numpy("logits")[0] - pred.logits[0]).max() <= 1e-5
    after = settled_metrics(served.metrics)
    requests = after.requests - before.requests
    executions = after.executions - before.executions
    assert requests == 32 and after.failures == before.failures
    assert 1 <= executions < requests, f"{requests} requests ran in {executions} executions: no batching"


def _bomb() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (PIL checks the size before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _assert_good(module, client, good: bytes, pred) -> None:
    result = client.infer("cvt", request_inputs(module, images=[good]))
    assert np.abs(result.as_numpy("logits")[0] - pred.logits[0]).max() <= 1e-5


def test_bad_requests_get_errors_and_the_server_keeps_serving(served, reference, demo_bundle):
    """Every malformed request gets an error status (HTTP 400 / gRPC INVALID_ARGUMENT) naming the
    problem; a good request right after it is answered correctly. Triton refuses shapes, dtypes
    and sizes itself; what only the model can see is refused by the model, with the fix."""
    from tritonclient.utils import InferenceServerException

    from cvt_deploy.bundle import Bundle

    _, files, pred, pixels = reference
    good = Path(files[0]).read_bytes()
    nan = pixels[:1].copy()
    nan[0, 1, 2, 3] = np.nan
    over = Bundle.open(demo_bundle).batch.max + 1  # one image over what Triton batches
    for module, client in clients(served):
        by_triton = [(request_inputs(module, pixels=pixels[:, :, :32, :32]), "shape"),
                     (request_inputs(module, pixels=np.zeros((1, 5, 64, 64), np.float32)), "shape"),
                     (request_inputs(module, images=[good] * over), f"batch-size must be <= {over - 1}"),
                     (request_inputs(module, pixels=np.zeros((over, 3, 64, 64), np.float32)), "batch-size")]
        wrong_dtype = module.InferInput("pixels", [1, 3, 64, 64], "FP64")
        wrong_dtype.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float64))
        by_triton.append(([wrong_dtype], "FP64"))
        for inputs, says in by_triton:
            with pytest.raises(InferenceServerException) as err:
                client.infer("cvt", inputs)
            assert says in str(err.value), (module.__name__, str(err.value)[-500:])
            assert err.value.status() == BAD_REQUEST[module.__name__], (module.__name__, err.value.status())
            _assert_good(module, client, good, pred)
        by_model = [(request_inputs(module, images=[b"these bytes are not an image"]), "not a readable image"),
                    (request_inputs(module, images=[b""]), "not a readable image"),
                    (request_inputs(module, images=[good[: len(good) // 2]]), "not a readable image"),
                    (request_inputs(module, images=[_bomb()]), "decompression bomb"),
                    (request_inputs(module, pixels=nan), "NaN or infinite"),
                    (request_inputs(module, pixels=pixels[:2] * 1000), "far outside"),
                    (request_inputs(module, images=[good]) + request_inputs(module, pixels=pixels[:1]), "exactly one")]
        for inputs, says in by_model:
            with pytest.raises(InferenceServerException) as err:
                client.infer("cvt", inputs)
            message = err.value.message()
            assert err.value.status() == BAD_REQUEST[module.__name__], (module.__name__, err.value.status(), message)
            assert says in message and "fix: " in message, (module.__name__, message)
            assert "Traceback" not in message and "/cvt_deploy/" not in message
            _assert_good(module, client, good, pred)


def test_bad_requests_batched_with_good_ones_fail_alone(served, reference):
    """Requests in flight together are batched by Triton: the good ones are answered correctly,
    each bad one gets its own error status (HTTP 400), and the server is not counted as failing."""
    import tritonclient.http as thttp
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    _, files, pred, _ = reference
    encoded = [Path(f).read_bytes() for f in files]
    before = settled_metrics(served.metrics)
    client = thttp.InferenceServerClient(served.http, concurrency=24)
    kinds = ["good", "good", "bad"] * 8
    pending = [client.async_infer("cvt", request_inputs(thttp, images=[encoded[i % len(encoded)] if k == "good"
                                                                       else b"garbage %d" % i]))
               for i, k in enumerate(kinds)]
    for i, (kind, p) in enumerate(zip(kinds, pending)):
        if kind == "good":
            logits = p.get_result().as_numpy("logits")[0]
            assert np.abs(logits - pred.logits[i % len(encoded)]).max() <= 1e-5, i
        else:
            with pytest.raises(InferenceServerException, match="not a readable image") as err:
                p.get_result()
            assert err.value.status() == "400", err.value.status()
    after = settled_metrics(served.metrics)
    assert after.executions - before.executions < len(kinds), "the requests were never batched together"
    assert after.failures == before.failures
    # the same over gRPC: each bad request of a batch gets INVALID_ARGUMENT, the good ones their answers
    answers: list[object] = [None] * len(kinds)
    grpc_client = tgrpc.InferenceServerClient(served.grpc)
    done = threading.Semaphore(0)

    def callback(i: int, result: object, error: object) -> None:
        answers[i] = error if error is not None else result
        done.release()

    for i, kind in enumerate(kinds):
        data = encoded[i % len(encoded)] if kind == "good" else b"garbage %d" % i
        grpc_client.async_infer("cvt", request_inputs(tgrpc, images=[data]), functools.partial(callback, i))
    for _ in kinds:
        assert done.acquire(timeout=60)
    for i, (kind, answer) in enumerate(zip(kinds, answers)):
        if kind == "good":
            assert np.abs(answer.as_numpy("logits")[0] - pred.logits[i % len(encoded)]).max() <= 1e-5, i
        else:
            assert isinstance(answer, InferenceServerException) and "not a readable image" in answer.message(), answer
            assert answer.status() == "StatusCode.INVALID_ARGUMENT", answer.status()
    grpc_client.close()


def _tree_rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def test_memory_stays_bounded_under_bursts_of_large_bad_requests(served, reference):
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    _, files, pred, _ = reference
    junk = np.random.default_rng(0).bytes(4 << 20)  # 4 MiB that are not an image
    client = thttp.InferenceServerClient(served.http, concurrency=16)
    rss = []
    for _ in range(10):
        pending = [client.async_infer("cvt", request_inputs(thttp, images=[junk])) for _ in range(16)]
        for p in pending:
            with pytest.raises(InferenceServerException) as err:
                p.get_result()
            assert err.value.status() == "400", err.value.status()
        rss.append(_tree_rss_mb(served.proc.pid))
    print("server RSS after each burst (MB):", [round(r) for r in rss])
    # Pools grow while the first bursts find their size, then are reused: a leak of what the
    # requests carried would add ~64 MB a burst (~256 MB between the two means). Compare the last
    # bursts with the middle ones.
    early, late = sum(rss[2:6]) / 4, sum(rss[6:]) / 4
    assert late - early < 96, f"server memory after each burst of 16 x 4 MiB bad requests: {rss} MB"
    _assert_good(thttp, thttp.InferenceServerClient(served.http), Path(files[0]).read_bytes(), pred)


def test_served_benchmark_sweeps_concurrency_with_the_bench_files(served, demo_bundle, tmp_path, capsys):
    """cvt-bench --url: rows per level with Triton's batch sizes, beside in-process rows, in the usual files."""
    from cvt_deploy.bench import BenchResult
    from cvt_deploy.cli.bench import main

    out = tmp_path / "served.json"
    code = main(["--url", f"http://{served.http}", "--metrics-url", served.metrics, "--concurrency", "1,4",
                 "--bundle", str(demo_bundle), "--batch", "1,4", "--threads", "1", "--quick", "--quiet",
                 "--save", str(out), "--save", str(tmp_path / "served.csv")])
    text = capsys.readouterr().out
    assert code == 0, text
    result = BenchResult.from_json(out)
    levels = {r.concurrency: r for r in result.rows if r.concurrency is not None}
    assert sorted(levels) == [1, 4] and all(r.status == "ok" and r.throughput_ips > 0 for r in levels.values())
    assert levels[1].server_batch is not None and levels[1].server_batch >= 1
    assert [r.batch for r in result.rows if r.role == "in-process"] == [1, 4]
    assert "in flight" in text and "served / in-process:" in text
    assert "concurrency,server_batch" in (tmp_path / "served.csv").read_text().splitlines()[0]


def test_served_benchmark_of_a_model_not_served_is_a_clear_error(served, capsys):
    from cvt_deploy.cli.bench import main

    assert main(["--url", f"http://{served.http}", "--model-name", "nope", "--quick", "--quiet"]) == 2
    assert "does not serve model 'nope'" in capsys.readouterr().err


def test_sigterm_stops_triton_and_its_children_and_frees_the_ports(served):
    """Runs last: stops the module's server."""
    below = descendants(served.proc.pid)
    assert len(below) >= 2, f"expected tritonserver and its Python stub below cvt-serve, found {below}"
    with cpu_load():  # a busy machine: the stop still takes seconds
        sent = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 128 + signal.SIGTERM, "".join(served.output)
        took = time.monotonic() - sent
    assert took < 20, f"took {took:.1f} s to stop"
    assert "stopped (SIGTERM)" in "".join(served.output)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in below if alive(p)], "processes left behind after SIGTERM"
    assert all(port_free(p) for p in served.ports)
    print("".join(served.output))


def test_port_in_use_is_a_clear_error(demo_bundle, capsys):
    from cvt_deploy.cli.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http, grpc = free_ports(2)
        code = main(["--bundle", str(demo_bundle), "--host", "127.0.0.1", "--http-port", str(http),
                     "--grpc-port", str(grpc), "--metrics-port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--metrics-port" in err


def test_serve_options_are_checked_before_anything_starts():
    from cvt_deploy.serve.server import ServeOptions

    with pytest.raises(CvtDeployError, match="must differ"):
        ServeOptions(http_port=9000, grpc_port=9000)
    with pytest.raises(CvtDeployError, match="model name"):
        ServeOptions(model_name="my model")
    with pytest.raises(CvtDeployError, match="--instances 0"):
        ServeOptions(instances=0)
