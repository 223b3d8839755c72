"""Pipeline stages, each a verb: ``export_onnx``, ``simplify``, ``convert_fp16``,
``quantize_int8``, ``build_engine``; ``export_bundle`` runs them into a checked bundle.

Import the stage modules directly (``cvt_deploy.export.onnx`` ...): each pulls in its
heavy library only when called.
"""
