"""What a cvt-deploy ONNX graph says about itself, read the same way by every backend that runs one.

A graph carries its model config, precision and input/output kinds in ``metadata_props``
(export/onnx.py, export/rawpixel.py stamp them); ONNX Runtime and OpenVINO each hand those
over as a mapping, and each reports the graph's input and output as a type and a shape.
This module turns both into the runtime's facts and refuses a graph whose inputs or
outputs contradict its config, whichever library read it.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from ..config import CvtConfig
from ..errors import CvtDeployError
from ..util import CONFIG_KEY, PRECISION_KEY, PRECISIONS

#: A dimension as a library reports it: a number, or None / a name where it is dynamic.
Dim = int | str | None


def graph_identity(meta: Mapping[str, str], path: str | os.PathLike[str], config: CvtConfig | None,
                   precision: str | None) -> tuple[CvtConfig, str]:
    """The model config and precision of the graph at ``path`` from its metadata ``meta``;
    ``config``/``precision`` given by the caller (a bundle's) take their place."""
    if config is None:
        if CONFIG_KEY not in meta:
            raise CvtDeployError(f"{path} carries no cvt-deploy metadata, so its preprocessing and labels are unknown",
                                 "export it with cvt-export, or load its bundle folder instead")
        config = CvtConfig.from_json(meta[CONFIG_KEY], f"{path} (metadata_props {CONFIG_KEY})")
    precision = precision or meta.get(PRECISION_KEY, "fp32")
    if precision not in PRECISIONS:
        raise CvtDeployError(f"{path} says its precision is {precision!r} (metadata_props {PRECISION_KEY})",
                             f"it must be one of {', '.join(PRECISIONS)}: re-export the graph with cvt-export")
    return config, precision


def check_graph_io(path: str | os.PathLike[str], config: CvtConfig, input_format: str, input_type: str,
                   takes_uint8: bool, input_shape: Sequence[Dim], output_shape: Sequence[Dim]) -> None:
    """The graph must take the images and give the classes its config says: a graph swapped
    into a bundle, or metadata of another model, would otherwise answer with wrong labels.

    ``input_type`` is the input's element type as the library spells it (for the message);
    ``takes_uint8`` whether that is uint8.
    """
    from ..preprocess import graph_dims

    if takes_uint8 != input_format.startswith("uint8"):
        raise CvtDeployError(f"{path} takes {input_type} but says its input format is {input_format!r}",
                             "the graph was edited after export: re-export it with cvt-export")
    inp, out = list(input_shape), list(output_shape)
    want_in = list(graph_dims(config.preprocess, input_format))
    got_in = inp[1:] if len(inp) == 4 else None
    if got_in is None or any(isinstance(g, int) and g != w for g, w in zip(got_in, want_in)):
        raise CvtDeployError(f"{path} takes input of shape {inp}, but its model config says (N, {', '.join(map(str, want_in))})",
                             "the graph and its bundle/metadata do not belong together: re-export with cvt-export")
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != config.num_classes):
        raise CvtDeployError(f"{path} outputs shape {out}, but its model config has {config.num_classes} classes",
                             "the graph and its bundle/metadata do not belong together: re-export with cvt-export")
