"""What the served model answers a batch of requests with (:func:`infer_batch`): the predictions
of one runtime call, and a :class:`Refusal` for each request that cannot be answered. Run in
Triton's Python-backend stub (serve/backend.py); nothing here needs Triton."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import CvtDeployError
from .protocol import CLASSES, IMAGES, LABELS, LOGITS, PIXELS, SCORES

if TYPE_CHECKING:
    from ..config import CvtConfig
    from ..runtimes.base import Runtime


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


@dataclass(frozen=True)
class Refusal:
    """The answer to a request that cannot be answered: what is wrong and the fix, never a
    traceback or a server path. ``bad_request``: the request's fault (HTTP 400 / gRPC
    INVALID_ARGUMENT); else the server's (HTTP 500 / INTERNAL)."""

    message: str
    bad_request: bool = True


def _problem(message: str, hint: str | None) -> str:
    return message + (f" (fix: {hint})" if hint else "")


def infer_batch(runtime: Runtime, requests: Sequence[Any], topk: int) -> list[dict[str, np.ndarray] | Refusal]:
    """What Triton asks of the model: an answer per request (``{input name: array}``), one runtime
    call for all. A request that cannot be answered gets a :class:`Refusal`; the others in the batch
    are answered as if it had not been there."""
    from ..runtimes.base import Prediction

    read: list[np.ndarray | Refusal] = []  # per request: its preprocessed batch, or what is wrong with it
    for request in requests:
        try:
            read.append(_request_pixels(request, runtime.config))
        except CvtDeployError as e:
            read.append(Refusal(_problem(e.message, e.hint)))
        except Exception as e:  # a request the checks did not foresee: its kind only, details to the log
            read.append(Refusal(f"the server could not read this request ({type(e).__name__})", bad_request=False))
            print(f"cvt-serve: a request failed unexpectedly: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    good = [b for b in read if not isinstance(b, Refusal)]
    logits = runtime.run(np.concatenate(good)) if good else np.zeros((0, runtime.config.num_classes), np.float32)
    pred = Prediction.from_logits(logits, runtime.config, topk)
    out: list[dict[str, np.ndarray] | Refusal] = []
    start = 0
    for b in read:
        if isinstance(b, Refusal):
            out.append(b)
            continue
        end = start + len(b)
        if not np.isfinite(logits[start:end]).all():
            out.append(Refusal(_problem(
                f"the {runtime.backend} {runtime.precision} model produced NaN/inf logits for this request's input",
                "the precision overflowed on this input: check with cvt-check, or use a higher precision"),
                bad_request=False))
        else:
            out.append({LOGITS: logits[start:end],
                        CLASSES: pred.indices[start:end].astype(np.int64),
                        SCORES: pred.scores[start:end],
                        LABELS: np.array([[lab.encode() for lab in row] for row in pred.labels[start:end]],
                                         dtype=np.object_)})
        start = end
    return out
