"""The one runtime interface every backend implements.

A runtime only runs: loaders (``from_bundle``) build it from a bundle, ``run`` maps a
preprocessed NCHW float32 batch (or uint8 pixels at the model's size) to logits, and
``predict`` adds preprocessing, input checks and top-k on top. Graphs that take raw pixels
or give probabilities (``input_format``/``output_kind``, export/rawpixel.py) are fed and
read here, so every caller sees the same contract whatever the graph takes. Backends live one per file and never branch on each other.

Thread safety: ``predict`` keeps no per-call state on the runtime. Each backend documents
how its ``run`` may be shared; all shipped backends allow calling one runtime from several
threads at once (ONNX Runtime sessions are thread-safe, PyTorch inference runs under
``torch.inference_mode``, the TensorRT runtime serialises its execution context with a lock).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from ..artifacts import PRECISIONS, RUNS, select
from ..config import CvtConfig
from ..errors import CvtDeployError
from ..preprocess import Images, graph_input, preprocess, preprocess_pixels

if TYPE_CHECKING:
    from ..bundle import BatchRange, Bundle


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def check_topk(topk: object) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise CvtDeployError(f"--topk {topk!r} must be a whole number >= 1 (classes shown per image)",
                             "use --topk 1 for the best class only; values above the class count show all classes")
    return topk


@dataclass(frozen=True)
class Prediction:
    """Logits of a batch and their top-k classes (softmax probabilities as scores)."""

    logits: np.ndarray
    indices: np.ndarray   # (N, k) class indices, best first
    scores: np.ndarray    # (N, k) probabilities
    labels: list[list[str]]

    @classmethod
    def from_logits(cls, logits: np.ndarray, config: CvtConfig, topk: int = 5) -> Prediction:
        """``topk`` >= 1 classes per image (all of them when the model has fewer)."""
        check_topk(topk)
        k = min(topk, logits.shape[1])
        probs = softmax(logits.astype(np.float64))
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return cls(logits, idx, np.take_along_axis(probs, idx, 1).astype(np.float32),
                   [[config.label(int(i)) for i in row] for row in idx])

    @classmethod
    def concat(cls, parts: list[Prediction]) -> Prediction:
        """One prediction from the predictions of consecutive chunks of images."""
        return cls(np.concatenate([p.logits for p in parts]), np.concatenate([p.indices for p in parts]),
                   np.concatenate([p.scores for p in parts]), [lab for p in parts for lab in p.labels])

    @property
    def top1(self) -> np.ndarray:
        return self.indices[:, 0]

    def to_dict(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        return [{"input": names[n] if names else n,
                 "top": [{"class": int(i), "label": lab, "score": round(float(s), 6)}
                         for i, lab, s in zip(self.indices[n], self.labels[n], self.scores[n])]}
                for n in range(len(self.indices))]

    def to_json(self, names: list[str] | None = None) -> str:
        return json.dumps(self.to_dict(names), indent=2)

    def table(self, names: list[str] | None = None) -> str:
        from ..table import format_table

        rows = []
        for n in range(len(self.indices)):
            name = names[n] if names else f"#{n}"
            for r, (lab, s) in enumerate(zip(self.labels[n], self.scores[n])):
                rows.append([name if r == 0 else "", str(r + 1), lab, f"{100 * float(s):6.2f}%"])
        return format_table(["input", "rank", "label", "score"], rows)


_R = TypeVar("_R", bound="Runtime")


class Runtime(ABC):
    """A loaded model on one backend. Subclasses set ``backend`` and implement ``run``."""

    backend: ClassVar[str]
    #: What to install for this backend, shown when it is unavailable.
    install_hint: ClassVar[str]

    #: The artifact kinds a reference implementation runs (a backend's are the registry's: artifacts.RUNS).
    artifact_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CvtConfig, precision: str, device: str, batch_range: BatchRange | None = None) -> None:
        self.config = config
        self.precision = precision
        self.device = device
        self.batch_range = batch_range  # the batch sizes one call takes; None: any
        self.input_format = "float"  # what the artifact takes (util.INPUT_FORMATS); loaders set it
        self.output_kind = "logits"  # "probs": the artifact ends in a softmax
        self.choice: str | None = None  # why load() picked this backend and graph, when it measured (choice.py)
        self.artifact: str | None = None  # the bundle artifact it runs, where from_bundle knows it

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The bundle artifact kinds this backend runs."""
        return RUNS.get(cls.backend) or cls.artifact_kinds

    @classmethod
    def artifact_in(cls, bundle: Bundle, precision: str | None = None, device: str | None = "cpu") -> Any | None:
        """The artifact this backend would run of ``bundle`` (artifacts.select), None if it has none;
        a reference's: the first of its kinds."""
        if cls.backend in RUNS:
            return select(bundle, cls.backend, precision, device)
        # decision: a reference implementation is not in the registry: it names its kinds itself
        return next((a for k in cls.artifact_kinds if (a := bundle.find(k, precision)) is not None), None)

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, device: str | None = None) -> str | None:
        """None when this backend can run here on ``device``; else why not, in one sentence."""

    @classmethod
    @abstractmethod
    def from_bundle(cls, bundle: Bundle, precision: str | None = None, device: str | None = None,
                    threads: int | None = None) -> Runtime:
        """Load this backend's artifact from a bundle (``threads``: CPU threads, None = library default)."""

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The artifact's input (``self.input_format``) with N inside ``self.batch_range`` ->
        (N, num_classes) float32 logits or probabilities (``self.output_kind``)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a preprocessed float32 NCHW batch, or (N, size, size, C) uint8 pixels, of any size.

        Batches above the artifact's maximum are split; a chunk below its minimum (a static
        batch, a TensorRT profile) is padded with zeros and the padding dropped again. A
        probabilities graph gives log-probabilities: the logits up to a per-image constant,
        which changes neither the softmax nor the ranking.
        """
        batch = graph_input(batch, self.config.preprocess, self.input_format)
        if self.batch_range is None or self.batch_range.min <= len(batch) <= self.batch_range.max:
            out = np.asarray(self._run(batch), dtype=np.float32)
        else:
            outs = []
            for i in range(0, len(batch), self.batch_range.max):
                chunk = batch[i:i + self.batch_range.max]
                n = len(chunk)
                if n < self.batch_range.min:
                    chunk = np.concatenate([chunk, np.zeros((self.batch_range.min - n, *chunk.shape[1:]), chunk.dtype)])
                outs.append(np.asarray(self._run(chunk), dtype=np.float32)[:n])
            out = np.concatenate(outs)
        if self.output_kind == "probs":
            out = np.log(np.maximum(out, np.finfo(np.float32).tiny))
        return out

    def set_io(self, input_format: str | None, output_kind: str | None, where: str) -> None:
        """Record what the artifact takes and gives (None: "float" / "logits"), refusing unknown values."""
        from ..util import INPUT_FORMATS, OUTPUT_KINDS

        fmt, kind = input_format or "float", output_kind or "logits"
        if fmt not in INPUT_FORMATS or kind not in OUTPUT_KINDS:
            raise CvtDeployError(f"{where} says its input format is {fmt!r} and its output {kind!r}; this cvt-deploy "
                                 f"knows inputs {', '.join(INPUT_FORMATS)} and outputs {', '.join(OUTPUT_KINDS)}",
                                 "upgrade cvt-deploy, or re-export the bundle with this one")
        self.input_format, self.output_kind = fmt, kind

    def predict(self, images: Images | np.ndarray, topk: int = 5) -> Prediction:
        """Top-k classes for paths, PIL images, uint8 arrays or a preprocessed float32 batch."""
        check_topk(topk)
        cfg = self.config.preprocess
        if self.input_format != "float" and not (isinstance(images, np.ndarray) and images.ndim == 4
                                                 and images.dtype not in (np.uint8, np.uint16)):
            batch = preprocess_pixels(images, cfg)  # straight to pixels: no normalise-and-undo round trip
        else:
            batch = preprocess(images, cfg)
        logits = self.run(batch)
        if not np.isfinite(logits).all():
            raise self._non_finite(batch)
        return Prediction.from_logits(logits, self.config, topk)

    def _non_finite(self, batch: np.ndarray) -> CvtDeployError:
        """Why logits came out NaN/inf: the input, the weights, or the precision -- said as it is."""
        lo, hi = float(batch.min()), float(batch.max())
        if max(abs(lo), abs(hi)) > 1e3:
            return CvtDeployError(
                f"the input batch holds values from {lo:.3g} to {hi:.3g}, far outside what normalised images hold "
                f"(about -3..3), and the {self.backend} {self.precision} model produced NaN/inf logits for it",
                "pass images and let preprocessing normalise them, or check how the batch was made")
        if self.precision == PRECISIONS[0]:  # the most precise: no precision to blame, the weights are suspect
            return CvtDeployError(f"the {self.backend} fp32 model produced NaN/inf logits for normal input",
                                  "the weights may be damaged: run cvt-check on the bundle, or re-export it")
        return CvtDeployError(
            f"the {self.backend} {self.precision} model produced NaN/inf logits for normal input",
            "the precision overflowed on this input: check with cvt-check, or use a higher precision")

    def describe(self) -> str:
        return f"{self.backend} {self.precision} on {self.device}"

    # -- lifecycle: every runtime can be used as ``with load(...) as runtime:`` ----------
    def synchronize(self) -> None:
        """Wait for work the backend queued asynchronously (CUDA); a no-op where calls block."""

    def close(self) -> None:
        """Release what the runtime holds (device memory, streams); it cannot run afterwards."""

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.variant} {self.describe()}>"
