"""What a served cvt-deploy model takes and returns (KServe v2 tensors), for server and clients.

Inputs, one of them per request (both optional in the model config):
  ``images``  BYTES  [N, 1]        encoded image files (PNG, JPEG, ...), preprocessed on the server
  ``pixels``  FP32   [N, C, H, W]  already preprocessed, as ``cvt_deploy.preprocess`` makes them
Outputs:
  ``logits``  FP32   [N, classes]
  ``classes`` INT64  [N, k]   top-k class indices, best first
  ``scores``  FP32   [N, k]   their softmax probabilities
  ``labels``  BYTES  [N, k]   their labels
A request that cannot be answered (an undecodable image, NaN pixels, both inputs ...) gets an
error status of its own, HTTP 400 / gRPC ``INVALID_ARGUMENT``, naming the problem and the fix
(tritonclient raises ``InferenceServerException``; ``.status()`` is "400" or
"StatusCode.INVALID_ARGUMENT"); the requests Triton batched with it are answered as usual. Wrong
shapes, dtypes and batches over the maximum are refused by Triton itself, with the same statuses.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_MODEL_NAME = "cvt"
IMAGES, PIXELS = "images", "pixels"
LOGITS, CLASSES, SCORES, LABELS = "logits", "classes", "scores", "labels"
OUTPUTS = (LOGITS, CLASSES, SCORES, LABELS)


def request_inputs(client_module: Any, images: Sequence[bytes] | None = None,
                   pixels: np.ndarray | None = None) -> list[Any]:
    """``InferInput`` objects of ``tritonclient.http`` or ``tritonclient.grpc`` (``client_module``)
    for encoded image files or a preprocessed float32 batch."""
    if (images is None) == (pixels is None):
        raise ValueError("pass images or pixels")
    if images is not None:
        data = np.array([[bytes(b)] for b in images], dtype=np.object_)
        inp = client_module.InferInput(IMAGES, list(data.shape), "BYTES")
    else:
        data = np.ascontiguousarray(pixels, dtype=np.float32)
        inp = client_module.InferInput(PIXELS, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return [inp]
