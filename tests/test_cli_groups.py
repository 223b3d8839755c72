"""--help groups each command's flags by the job they serve, as cvt-export does (tests/test_export_flags.py):
every flag --help shows is in exactly one of the command's groups, and the groups come in this order.
The parsers only: no export, no server, well under a second.
"""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Callable

import pytest

from cvt_deploy.cli import bench, check, common, serve

# command -> its groups in --help's order: title -> the flags (first spelling) in it
LAYOUT: dict[str, tuple[Callable[[], argparse.ArgumentParser], dict[str, list[str]]]] = {
    "cvt-bench": (bench.build_parser, {
        "what to time": ["--bundle", "--batch", "--threads"],
        "rows of the benchmark": ["--backend", "--precision", "--device", "--no-reference", "--no-hf",
                                  "--plain-openvino", "--torch-compile"],
        "timing": ["--iterations", "--min-time", "--warmup", "--rounds", "--quick"],
        "recording the CPU paths (--record)": ["--record"],
        "load test of a served model (--url)": ["--url", "--model-name", "--concurrency", "--protocol", "--send",
                                                "--images-per-request", "--metrics-url"],
        "output": ["--json", "--save", "--plot", "-q"],
    }),
    "cvt-check": (check.build_parser, {
        "what to check": ["--bundle", "--backend", "--precision"],
        "images": ["--data", "--limit"],
        "the parity check (the default)": ["--device", "--preprocess"],
        "layer by layer (--layers)": ["--layers", "--plot"],
        "which int8 layers to keep float (--rank-int8)": ["--rank-int8", "--rank-layers"],
        "TensorRT readiness (--tensorrt)": ["--tensorrt"],
        "output": ["--json", "-q"],
    }),
    "cvt-serve": (serve.build_parser, {
        "bundle and runtime (as cvt-predict)": ["--bundle", "--backend", "--precision", "--device", "--threads"],
        "the served model": ["--model-name", "--topk"],
        "addresses": ["--host", "--http-port", "--grpc-port", "--metrics-port"],
        "batching": ["--max-batch", "--max-queue-delay-us", "--instances"],
        "logs": ["--log-file", "-v"],
    }),
}
MODULES = {"cvt-bench": bench, "cvt-check": check, "cvt-serve": serve}


def shown_flags(ap: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every flag --help shows, but -h (not the older spellings, which are hidden)."""
    return [a for a in ap._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def own_groups(ap: argparse.ArgumentParser) -> list[argparse._ArgumentGroup]:
    """The command's groups: all but argparse's default two (positionals, options)."""
    return [g for g in ap._action_groups if g not in (ap._positionals, ap._optionals)]


@pytest.mark.parametrize("command", list(LAYOUT))
def test_every_flag_is_in_exactly_one_group(command: str) -> None:
    build, layout = LAYOUT[command]
    ap = build()
    groups = own_groups(ap)
    assert [g.title for g in groups] == list(layout), "the groups, in --help's order"
    assert [(g.title, g.description) for g in groups] == list(MODULES[command].GROUPS)
    in_groups = Counter(a for g in groups for a in g._group_actions)
    assert in_groups == Counter(shown_flags(ap)), "each flag --help shows is in exactly one group"
    # Outside the groups: -h and the hidden older spellings only.
    outside = [a for g in (ap._positionals, ap._optionals) for a in g._group_actions]
    assert all(isinstance(a, (argparse._HelpAction, common.DeprecatedAlias)) for a in outside), outside
    assert {g.title: [a.option_strings[0] for a in g._group_actions] for g in groups} == layout


@pytest.mark.parametrize("command", list(LAYOUT))
def test_help_shows_the_groups_in_order_each_saying_when_it_applies(command: str) -> None:
    build, layout = LAYOUT[command]
    text = build().format_help()
    at = [text.find(f"\n{title}:\n") for title in layout]
    assert -1 not in at and at == sorted(at), dict(zip(layout, at))
    for group in own_groups(build()):
        assert group.description and group.description.split("\n")[0] in text, group.title
