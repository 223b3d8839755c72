"""How cvt-serve serves a bundle: :class:`ServeOptions`, one object for the CLI, :class:`~.server.Server`
and the Triton process (serve/triton.py), validated here."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CvtDeployError
from .protocol import DEFAULT_MODEL_NAME

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's own defaults


@dataclass(frozen=True)
class ServeOptions:
    """How to serve a bundle: one object for ``cvt-serve`` and :class:`Server`, validated here.

    ``backend``/``precision``/``device``/``threads`` pick the runtime as ``cvt_deploy.load`` does
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
