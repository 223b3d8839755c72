"""The TensorRT backend, kept together as Polygraphy keeps ``backend/trt``: ``loader`` builds
engines (``build_engine``), ``runner`` runs them (``TensorRTRuntime``), ``sidecar`` records
what each plan was built with, ``util`` holds availability, CUDA and the shared logger.

Nothing here imports TensorRT, cuda-python or torch at import time.
"""
