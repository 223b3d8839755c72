"""A bundle on a real Triton Inference Server, through PyTriton: :class:`ServeOptions`, :class:`Server`.

PyTriton starts the ``tritonserver`` binary it ships (HTTP, gRPC, metrics) as a child process;
Triton's Python-backend stub (a grandchild) hands each batch that Triton's dynamic batcher
formed to :func:`infer_batch` in this process, which runs our :class:`~cvt_deploy.runtimes.Runtime`
once for the whole batch. So requests from many clients share one model call, and a served
result is exactly what ``predict`` gives in-process (same preprocessing, same runtime).

PyTriton can only fail a batch as a whole, so a request that cannot be answered (bytes that
are not an image, NaN pixels, ...) gets an ``error`` output naming the problem instead of the
others (protocol.py), and the requests batched with it are answered as usual. Triton itself
refuses wrong shapes, dtypes and batches over the maximum before batching.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import CvtDeployError, require
from .protocol import CLASSES, DEFAULT_MODEL_NAME, ERROR, IMAGES, LABELS, LOGITS, PIXELS, SCORES

if TYPE_CHECKING:
    from ..config import CvtConfig
    from ..runtimes.base import Runtime

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's own defaults


@dataclass(frozen=True)
class ServeOptions:
    """How to serve a bundle: one object for ``cvt-serve`` and :class:`Server`, validated here.

    ``backend``/``precision``/``device``/``threads`` pick the runtime as ``runtimes.load`` does
    (None: what it would pick). ``max_batch``: the largest batch Triton forms (default: the
    bundle's maximum). ``max_queue_delay_us``: how long Triton may hold a request to fill a
    batch. ``instances``: model instances, i.e. batches run at once (they share one runtime;
    every shipped runtime is thread-safe). ``topk``: labels and scores per image in responses.
    """

    backend: str | None = None
    precision: str | None = None
    device: str | None = None
    threads: int | None = None
    model_name: str = DEFAULT_MODEL_NAME
    host: str = "0.0.0.0"
    http_port: int = DEFAULT_PORTS["http"]
    grpc_port: int = DEFAULT_PORTS["grpc"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    max_batch: int | None = None
    max_queue_delay_us: int = 1000
    instances: int = 1
    topk: int = 5

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.model_name or ""):
            raise CvtDeployError(f"--model-name {self.model_name!r} is not a Triton model name",
                                 "use letters, digits, dots, underscores and dashes, e.g. cvt")
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise CvtDeployError(f"{flag} {port} is not a TCP port", "use a number from 1 to 65535 (0 is not allowed)")
        if len(set(ports.values())) < 3:
            raise CvtDeployError(f"the HTTP, gRPC and metrics ports must differ, got {sorted(ports.values())}",
                                 "pass three different --http-port, --grpc-port and --metrics-port")
        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-queue-delay-us", self.max_queue_delay_us, 0),
                                 ("--instances", self.instances, 1), ("--topk", self.topk, 1), ("--threads", self.threads, 1)):
            if value is not None and value < low:
                raise CvtDeployError(f"{flag} {value} is below {low}", f"pass {flag} {low} or more")

    @property
    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """A clear error naming the port when one is taken, before Triton fails on it less clearly."""
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise CvtDeployError(f"cannot listen for {what} on {host}:{port}: {e.strerror}",
                                     f"stop what uses port {port}, or pass another --{what}-port") from None


def triton_environment() -> None:
    """Put this interpreter's own libpython first on the library path of the Triton we start.

    Triton's Python-backend stub links libpython dynamically; on a Python built outside the
    system (pyenv, conda) it would otherwise load the system's libpython of the same version,
    and fail at model load (``'_thread.RLock' object has no attribute '_recursion_count'``).
    PyTriton starts tritonserver with a copy of ``os.environ``, so setting it here is enough.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not Path(libdir).is_dir():
        return
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if current.split(":")[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = libdir + (":" + current if current else "")


def _request_pixels(request: Any, config: CvtConfig) -> np.ndarray:
    """One request's images as a preprocessed batch, exactly as ``Runtime.predict`` makes it."""
    from ..preprocess import preprocess, validate_batch

    has_images, has_pixels = IMAGES in request, PIXELS in request
    if has_images == has_pixels:
        raise CvtDeployError(f"a request must carry exactly one of the inputs {IMAGES!r} (encoded image files, BYTES) "
                             f"or {PIXELS!r} (preprocessed float32 NCHW)",
                             f"send {IMAGES!r} or {PIXELS!r}, not {'both' if has_images else 'neither'}")
    if not len(request[IMAGES if has_images else PIXELS]):
        raise CvtDeployError("the request holds no images (a batch of 0)", "send at least one image per request")
    if has_pixels:
        return validate_batch(np.asarray(request[PIXELS]), config.preprocess)
    encoded = np.asarray(request[IMAGES]).reshape(len(request[IMAGES]), -1)
    if encoded.shape[1] != 1:
        raise CvtDeployError(f"input {IMAGES!r} has shape {np.asarray(request[IMAGES]).shape}: one image per row expected",
                             f"send {IMAGES!r} as [N, 1] BYTES, one encoded file per row")
    return preprocess([bytes(item) for item in encoded[:, 0]], config.preprocess)


def _rows(request: Any) -> int:
    """How many rows the request's input has (an error answer has as many)."""
    for name in (IMAGES, PIXELS):
        if name in request:
            return max(1, len(request[name]))
    return 1


def _error_response(request: Any, message: str) -> dict[str, np.ndarray]:
    return {ERROR: np.array([[message.encode("utf-8", "replace")]] * _rows(request), dtype=np.object_)}


def _problem(message: str, hint: str | None) -> str:
    return message + (f" (fix: {hint})" if hint else "")


def infer_batch(runtime: Runtime, requests: Sequence[Any], topk: int) -> list[dict[str, np.ndarray]]:
    """What Triton asks of the model: responses for a list of requests, one runtime call for all.

    A request that cannot be answered is answered with an ``error`` output (its problem and
    the fix, never a traceback or a server path); the others in the batch are answered as if
    it had not been there.
    """
    from ..runtimes.base import Prediction

    read: list[np.ndarray | str] = []  # per request: its preprocessed batch, or what is wrong with it
    for request in requests:
        try:
            read.append(_request_pixels(request, runtime.config))
        except CvtDeployError as e:
            read.append(_problem(e.message, e.hint))
        except Exception as e:  # a request the checks did not foresee: its kind only, details to the log
            read.append(f"the server could not read this request ({type(e).__name__})")
            print(f"cvt-serve: a request failed unexpectedly: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    good = [b for b in read if not isinstance(b, str)]
    logits = runtime.run(np.concatenate(good)) if good else np.zeros((0, runtime.config.num_classes), np.float32)
    pred = Prediction.from_logits(logits, runtime.config, topk)
    out, start = [], 0
    for request, b in zip(requests, read):
        if isinstance(b, str):
            out.append(_error_response(request, b))
            continue
        end = start + len(b)
        if not np.isfinite(logits[start:end]).all():
            out.append(_error_response(request, _problem(
                f"the {runtime.backend} {runtime.precision} model produced NaN/inf logits for this request's input",
                "the precision overflowed on this input: check with cvt-check, or use a higher precision")))
        else:
            out.append({LOGITS: logits[start:end],
                        CLASSES: pred.indices[start:end].astype(np.int64),
                        SCORES: pred.scores[start:end],
                        LABELS: np.array([[lab.encode() for lab in row] for row in pred.labels[start:end]],
                                         dtype=np.object_)})
        start = end
    return out


class Server:
    """A running ``tritonserver`` serving one runtime; ``with Server(bundle, options) as s: s.wait()``.

    :meth:`start` returns once the model is ready; :meth:`stop` (also on leaving the ``with``)
    stops Triton and its stub processes. :meth:`wait` blocks until SIGINT/SIGTERM or until
    Triton dies.
    """

    def __init__(self, bundle: str | os.PathLike[str], options: ServeOptions | None = None,
                 log_file: str | os.PathLike[str] | None = None) -> None:
        self.options = options or ServeOptions()
        self.bundle_path = bundle
        self.log_file = log_file  # Triton's own log; None: on stdout
        self.runtime: Runtime | None = None
        self._triton: Any = None
        self._stop = threading.Event()
        self.stopped_by: int | None = None  # the signal wait() stopped on

    def urls(self) -> dict[str, str]:
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host
        o = self.options
        return {"http": f"http://{host}:{o.http_port}", "grpc": f"{host}:{o.grpc_port}",
                "metrics": f"http://{host}:{o.metrics_port}/metrics",
                "model": f"http://{host}:{o.http_port}/v2/models/{o.model_name}"}

    def start(self) -> Server:
        require("pytriton", "serve", "Serving on Triton")
        from ..bundle import Bundle
        from ..runtimes import load

        o = self.options
        bundle = Bundle.open(self.bundle_path)
        max_batch = o.max_batch or bundle.batch.max
        check_ports_free(o.host, o.ports)
        self.runtime = load(bundle, o.backend, o.device, o.precision, o.threads)
        triton_environment()
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        cfg = self.runtime.config
        k = min(o.topk, cfg.num_classes)
        runtime = self.runtime
        infer: Callable[[Sequence[Any]], list[dict[str, np.ndarray]]] = lambda requests: infer_batch(runtime, requests, k)  # noqa: E731
        config = TritonConfig(http_address=o.host, http_port=o.http_port, grpc_address=o.host, grpc_port=o.grpc_port,
                              metrics_address=o.host, metrics_port=o.metrics_port, allow_gpu_metrics=False,
                              exit_timeout_secs=5, log_file=Path(self.log_file) if self.log_file else None)
        self._triton = Triton(config=config)
        try:
            self._triton.bind(
                model_name=o.model_name, infer_func=[infer] * o.instances,
                inputs=[Tensor(name=IMAGES, dtype=np.bytes_, shape=(1,), optional=True),
                        Tensor(name=PIXELS, dtype=np.float32, shape=(cfg.in_chans, cfg.img_size, cfg.img_size), optional=True)],
                outputs=[Tensor(name=LOGITS, dtype=np.float32, shape=(cfg.num_classes,)),
                         Tensor(name=CLASSES, dtype=np.int64, shape=(k,)),
                         Tensor(name=SCORES, dtype=np.float32, shape=(k,)),
                         Tensor(name=LABELS, dtype=np.bytes_, shape=(k,)),
                         Tensor(name=ERROR, dtype=np.bytes_, shape=(1,))],
                config=ModelConfig(max_batch_size=max_batch,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=o.max_queue_delay_us)),
                strict=True)
            self._triton.run()
        except Exception as e:
            self.stop()
            raise CvtDeployError(f"Triton did not start: {type(e).__name__}: {e}", self._log_hint()) from None
        return self

    def wait(self) -> None:
        """Serve until SIGINT/SIGTERM (main thread only; :attr:`stopped_by` says which) or until
        Triton stops by itself."""
        def stop(signum: int, frame: object) -> None:
            self.stopped_by = signum
            self._stop.set()

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, stop)
        while not self._stop.wait(0.5):
            if self._triton is None or not self._triton.is_alive():
                raise CvtDeployError("Triton stopped unexpectedly", self._log_hint())

    def _log_hint(self) -> str:
        return f"see Triton's log in {self.log_file}" if self.log_file else "see Triton's log above"

    def stop(self) -> None:
        self._stop.set()
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(server: Server) -> str:
    """The startup lines: what is served where."""
    assert server.runtime is not None
    rt, o, urls = server.runtime, server.options, server.urls()
    return "\n".join([
        f"serving {rt.config.variant} ({rt.describe()}) as model {o.model_name!r}",
        f"  HTTP     {urls['http']}   (KServe v2: POST {urls['model']}/infer)",
        f"  gRPC     {urls['grpc']}",
        f"  metrics  {urls['metrics']}",
        f"  model    {urls['model']}   (inputs, outputs, shapes)",
        *([f"  Triton's log: {server.log_file}"] if server.log_file else []),
    ])


def main_loop(server: Server) -> int:
    """Start, print the URLs and a ready line, serve until a signal, stop: what cvt-serve does.
    Returns the exit code: 128 + the signal that stopped it, as for every cvt-deploy command."""
    with server:
        print(describe(server), flush=True)
        print(f"ready (stop with Ctrl+C or kill -TERM {os.getpid()})", flush=True)
        server.wait()
    name = signal.Signals(server.stopped_by).name if server.stopped_by else "stopped by itself"
    print(f"stopped ({name}); Triton and its processes have exited", file=sys.stderr, flush=True)
    return 128 + server.stopped_by if server.stopped_by else 0
