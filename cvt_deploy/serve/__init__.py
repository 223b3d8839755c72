"""Serving on NVIDIA Triton Inference Server.

* :mod:`.server`: ``cvt-serve``: a bundle served by a real ``tritonserver`` (the one PyTriton
  ships: dynamic batching, HTTP and gRPC, metrics); needs the ``serve`` extra. :mod:`.options`
  says how, :mod:`.triton` runs the process, :mod:`.backend` is the model Triton runs (its stub
  loads the runtime), :mod:`.answer` what it answers: predictions, or a refusal per bad request.
* :mod:`.protocol`: the served model's tensors, shared by the server and its clients.
* :mod:`.repository`: a Triton model repository (native ONNX Runtime / TensorRT models) for
  production Triton containers, validated against Triton's own config schema.
* :mod:`.load`: a concurrency sweep against a running server (``cvt-bench --url``).

Nothing here is imported by ``import cvt_deploy``; PyTriton and tritonclient are imported
inside the functions that use them.
"""
