"""A bundle on a real Triton Inference Server: :class:`ServeOptions`, :class:`Server`.

cvt-serve runs the ``tritonserver`` binary that PyTriton ships (HTTP, gRPC, metrics) as a child
process (serve/triton.py), serving one Triton Python-backend model (serve/backend.py) whose stub
process loads the bundle's runtime as ``cvt_deploy.load`` does and answers each batch Triton's
dynamic batcher formed with :func:`infer_batch`: one runtime call for the whole batch, so
requests from many clients share one model call, and a served result is exactly what
``predict`` gives in-process (same preprocessing, same runtime).

Each request of a batch is answered on its own: one that cannot be answered (bytes that are not
an image, NaN pixels, ...) gets an error status of its own, HTTP 400 / gRPC ``INVALID_ARGUMENT``,
naming the problem and the fix, and the requests batched with it are answered as usual. Triton
itself refuses wrong shapes, dtypes and batches over the maximum before batching.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

from ..errors import CvtDeployError, require
from .answer import Refusal, infer_batch  # noqa: F401  (the served model's answers; public here too)
from .options import DEFAULT_PORTS, ServeOptions  # noqa: F401

if TYPE_CHECKING:
    from ..config import CvtConfig
    from .triton import TritonProcess


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """A clear error naming the port when one is taken, before Triton fails on it less clearly."""
    for what, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise CvtDeployError(f"cannot listen for {what} on {host}:{port}: {e.strerror}",
                                     f"stop what uses port {port}, or pass another --{what}-port") from None


class Server:
    """A running ``tritonserver`` serving one bundle; ``with Server(bundle, options) as s: s.wait()``.

    :meth:`start` returns once the model is ready; :meth:`stop` (also on leaving the ``with``)
    stops Triton and its stub processes. :meth:`wait` blocks until SIGINT/SIGTERM or until
    Triton dies.
    """

    def __init__(self, bundle: str | os.PathLike[str], options: ServeOptions | None = None,
                 log_file: str | os.PathLike[str] | None = None) -> None:
        self.options = options or ServeOptions()
        self.bundle_path = bundle
        self.log_file = log_file  # Triton's own log; None: on stdout
        self.config: CvtConfig | None = None
        self.description = ""  # the served runtime, as Runtime.describe() says it
        self._triton: TritonProcess | None = None
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
        from ..backends import load
        from .triton import TritonProcess, distribution, model_config

        o = self.options
        distribution()  # a PyTriton without Triton for this Python fails here, before anything loads
        bundle = Bundle.open(self.bundle_path)
        max_batch = o.max_batch or bundle.batch.max
        check_ports_free(o.host, o.ports)
        # Loaded here first: what would fail in Triton's stub fails here with our own message,
        # and the choice load() makes (backend, precision) is pinned for the stub.
        runtime = load(bundle, o.backend, o.device, o.precision, o.threads)
        try:
            self.config, self.description = runtime.config, runtime.describe()
            how = {"bundle": str(bundle.root), "backend": runtime.backend, "precision": runtime.precision,
                   "device": o.device, "threads": o.threads, "topk": o.topk}
            text = model_config(o, runtime.config, max_batch, how)
        finally:
            runtime.close()
        self._triton = TritonProcess(o, text, self.log_file)
        hint = self._triton.log_hint()
        try:
            self._triton.start()
        except (CvtDeployError, KeyboardInterrupt, SystemExit):
            self.stop()
            raise
        except Exception as e:  # e.g. the binary cannot run here
            self.stop()
            raise CvtDeployError(f"Triton did not start: {type(e).__name__}: {e}", hint) from None
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
            if self._triton is None or not self._triton.alive():
                hint = self._triton.log_hint() if self._triton else "see Triton's log"
                raise CvtDeployError("Triton stopped unexpectedly", hint)

    def stop(self) -> None:
        self._stop.set()
        if self._triton is not None:
            self._triton.stop()
            self._triton = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(server: Server) -> str:
    """The startup lines: what is served where."""
    assert server.config is not None
    o, urls = server.options, server.urls()
    return "\n".join([
        f"serving {server.config.variant} ({server.description}) as model {o.model_name!r}",
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
