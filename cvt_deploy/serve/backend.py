"""The model Triton runs for cvt-serve: a Triton Python-backend model (``TritonPythonModel``).

It lives in Triton's Python-backend stub process (one per model instance), loads the bundle's
runtime there as ``cvt_deploy.load`` does, and answers each batch Triton's dynamic batcher forms
with one runtime call (:func:`~cvt_deploy.serve.answer.infer_batch`). Because the Python backend
answers every request of a batch on its own, a request that cannot be answered (bytes that are
not an image, NaN pixels, both inputs ...) gets its own error status, HTTP 400 / gRPC
``INVALID_ARGUMENT``, with the problem and the fix, and the requests batched with it are
answered as usual (Triton's own tests of this: triton-inference-server/server PR #2764).

``triton_python_backend_utils`` exists only inside the stub, so it is imported there; the rest
of cvt_deploy is imported as usual (the stub runs this interpreter's environment).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runtimes.base import Runtime

#: The model-config parameter that carries how to load the runtime (serve/triton.py writes it).
PARAMETER = "cvt_serve"


class TritonPythonModel:
    """What Triton calls: ``initialize`` once per instance, ``execute`` per batch, ``finalize`` at unload."""

    def initialize(self, args: dict[str, Any]) -> None:
        from ..backends import load

        config = json.loads(args["model_config"])
        how = json.loads(config["parameters"][PARAMETER]["string_value"])
        self.runtime: Runtime | None = load(how["bundle"], how["backend"], how["device"], how["precision"], how["threads"])
        self.topk = int(how["topk"])
        self.inputs = [i["name"] for i in config["input"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils  # only inside Triton's stub

        from .answer import Refusal, infer_batch

        read = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs}
            read.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        responses = []
        assert self.runtime is not None, "execute after finalize"
        for answer in infer_batch(self.runtime, read, self.topk):
            if isinstance(answer, Refusal):
                code = pb_utils.TritonError.INVALID_ARG if answer.bad_request else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(answer.message, code)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, array) for name, array in answer.items()]))
        return responses

    def finalize(self) -> None:
        runtime, self.runtime = getattr(self, "runtime", None), None
        if runtime is not None:
            runtime.close()
