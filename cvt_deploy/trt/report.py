"""What NVIDIA's parser and builder said about one graph (a :class:`BuildReport`), for a build
that made an engine and for one that only checked the graph (trt/rtx.py)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import CvtDeployError


@dataclass
class BuildReport:
    """What the real parser and builder said about one graph."""

    graph: str
    toolkit: str
    version: str
    precision: str
    parsed: bool = False
    built: bool = False
    layers: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.built

    @property
    def verdict(self) -> str:
        return "built" if self.built else "parsed, build failed" if self.parsed else "parse failed"

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "toolkit": self.toolkit, "version": self.version, "precision": self.precision,
                "parsed": self.parsed, "built": self.built, "layers": self.layers, "seconds": round(self.seconds, 2),
                "errors": self.errors, "warnings": self.warnings}

    def __str__(self) -> str:
        head = (f"{self.graph} on {self.toolkit} {self.version}: {self.verdict}"
                + (f" ({self.layers} layers, {self.seconds:.1f}s)" if self.parsed else ""))
        return "\n".join([head, *(f"  error: {e}" for e in self.errors), *(f"  warning: {w}" for w in self.warnings)])


class BuildFailed(CvtDeployError):
    """The parser or the builder refused a graph; ``report`` holds every message."""

    def __init__(self, message: str, hint: str, report: BuildReport) -> None:
        super().__init__(message, hint)
        self.report = report


def counted(messages: Sequence[str]) -> list[str]:
    """Each distinct message once, with how often it came (the int8 builds repeat theirs per conv)."""
    return [m if n == 1 else f"{m} (x{n})" for m, n in Counter(m for m in messages if m).items()]
