"""cvt-export's flags: grouped in --help by the job they serve, and one table (APPLIES) that says in
which modes (--format, with or without --bundle, and a few conditions beyond) each flag counts.

A flag given where it changes nothing is refused before any work, in words made of that table:
these tests walk the table, so a new flag without a decision, or a mode a flag is wrongly
refused in, fails here. In-process and before any export: a few seconds in all.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest

from cvt_deploy.cli import common, export
from cvt_deploy.cli.export_flags import APPLIES, GROUPS, MODES, NEEDS, Mode, Scope

# A value for each flag that takes one (and differs from its default); flags with choices take
# their first choice that is not the default, store_true flags none.
SAMPLE = {"model": "cvt-13", "weights": "w.pth", "heads": "1,3,6", "config": "c.json", "img_size": "96",
          "opset": "18", "batch_range": "1:4:8", "data": "imgs", "limit": "5", "calib": "c.npy",
          "calib_method": "entropy", "calib_count": "8", "calib_cache": "cache", "int8_keep_float": "head",
          "int8_max_drop": "0.5", "workspace": "512", "timing_cache": "tc", "dla_core": "0", "triton_name": "m",
          "triton_instances": "2", "operate_on_gie_id": "3", "classifier_threshold": "0.3", "precision": "fp16",
          "bundle": "b", "out": "o"}
# For each condition beyond the mode: what makes it fail, and what makes it hold.
NEED_FAILS = {"int8": [], "checked": ["--no-check"], "a model": [], "weights": [], "secondary": []}
NEED_HOLDS = {"int8": ["--precision", "int8"], "checked": [], "a model": ["--model", "cvt-13"],
              "weights": ["--weights", "w.pth"], "secondary": ["--classifier-mode", "secondary"]}


def flags(ap: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of every flag --help shows (not -h, not the older spellings)."""
    return {a.dest: a for a in ap._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)}


ACTIONS = flags(export.build_parser())


def typed(dest: str) -> list[str]:
    """The flag as a user types it, with a value that is not its default."""
    action = ACTIONS[dest]
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, next(c for c in action.choices if c != action.default)]
    return [flag, SAMPLE[dest]]


def mode_argv(mode: Mode) -> list[str]:
    return ["--format", mode.format, *(["--bundle", "b"] if mode.bundle else [])]


def spelt(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def scope_of(dest: str) -> Scope:
    return next(scope for dests, scope in APPLIES if dest in dests)


# --- (a) every flag: in one group, and in the table ---------------------------------------------

def test_every_flag_is_in_exactly_one_group_and_in_the_table() -> None:
    ap = export.build_parser()
    titles = [title for title, _ in GROUPS]
    groups = [g for g in ap._action_groups if g.title in titles]
    assert [g.title for g in groups] == titles
    in_groups = Counter(a.dest for g in groups for a in g._group_actions)
    assert in_groups == Counter(list(ACTIONS)), "each flag --help shows is in exactly one of the groups"
    outside = [a for g in ap._action_groups if g not in groups for a in g._group_actions]
    assert all(isinstance(a, (argparse._HelpAction, common.DeprecatedAlias)) for a in outside), outside
    in_table = Counter(d for dests, _ in APPLIES for d in dests)
    assert in_table == Counter(list(ACTIONS)), "each flag has exactly one row in APPLIES (where it applies)"
    # The table follows --help's groups: its rows never go back to an earlier group.
    group_of = {a.dest: titles.index(g.title) for g in groups for a in g._group_actions}
    order = [group_of[d] for dests, _ in APPLIES for d in dests]
    assert order == sorted(order)
    for dests, scope in APPLIES:
        assert len({group_of[d] for d in dests}) == 1, dests  # a row is one group's
        assert scope.modes and scope.modes <= MODES and set(scope.needs) <= set(NEEDS), dests
        assert scope.missing or scope.modes == MODES, dests  # where a flag can be refused, it says what is missing
    assert set(NEED_FAILS) == set(NEED_HOLDS) == set(NEEDS)
    takes_a_value = {d for d, a in ACTIONS.items() if a.nargs != 0 and not a.choices}
    assert takes_a_value <= set(SAMPLE), takes_a_value - set(SAMPLE)


# --- (b) a flag where it cannot apply: refused, naming the flag, the mode and the fix -----------

OUT_OF_MODE = [(mode, dest) for mode in sorted(MODES) for dests, scope in APPLIES if mode not in scope.modes
               for dest in dests]
NEEDED = [(mode, dest, need) for dests, scope in APPLIES for need in scope.needs for mode in sorted(scope.modes)
          for dest in dests]


def refusal(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """(error line, fix line) of a command that must refuse before any work."""
    out = tmp_path / "out"
    assert export.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists(), err
    error = next(line for line in err.splitlines() if line.startswith("error: "))
    fix = next(line for line in err.splitlines() if line.startswith("  fix: "))
    return error, fix


def test_the_table_covers_every_mode() -> None:
    assert {mode for mode, _ in OUT_OF_MODE} == MODES and len(MODES) == 10
    assert {dest for _, dest, _ in NEEDED} == {"img_size", "activation", "heads", "config", "data", "limit", "calib",
                                               "calib_method", "calib_count", "calib_cache", "int8_keep_float",
                                               "int8_max_drop", "operate_on_gie_id"}


@pytest.mark.parametrize("mode, dest", OUT_OF_MODE, ids=[f"{' '.join(mode_argv(m))} {spelt(d)}" for m, d in OUT_OF_MODE])
def test_a_flag_of_another_mode_is_refused_with_the_fix(no_work: None, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], mode: Mode,
                                                        dest: str) -> None:
    scope, flag = scope_of(dest), spelt(dest)
    error, fix = refusal([*mode_argv(mode), *typed(dest)], tmp_path, capsys)
    assert error.startswith(f"error: {flag} has no effect here: {scope.missing} ("), error
    if mode.bundle and mode._replace(bundle=False) in scope.modes:  # the mode's --bundle is what is wrong
        assert "(--bundle): that bundle is used as it is" in error and "export anew without --bundle" in fix
    else:  # its --format is: the fix names the formats where the flag counts
        assert f"(--format {mode.format}" in error and "--format " in fix, (error, fix)
        assert all(f in fix for f in {m.format for m in scope.modes if m.bundle == mode.bundle}), fix
    assert fix.endswith(f", or drop {flag}"), fix


@pytest.mark.parametrize("mode, dest, need", NEEDED, ids=[f"{' '.join(mode_argv(m))} {spelt(d)} without {n}"
                                                          for m, d, n in NEEDED])
def test_a_flag_whose_condition_does_not_hold_is_refused_with_the_fix(no_work: None, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str], mode: Mode,
                                                                      dest: str, need: str) -> None:
    error, fix = refusal([*mode_argv(mode), *NEED_FAILS[need], *typed(dest)], tmp_path, capsys)
    why = NEEDS[need].why
    assert error.startswith(f"error: {spelt(dest)} has no effect here: "), error
    assert (why if isinstance(why, str) else why(argparse.Namespace(model=None))) in error
    assert fix.startswith(f"  fix: {NEEDS[need].fix}, or ") and fix.endswith(spelt(dest)), fix


@pytest.mark.parametrize("mode", sorted(MODES), ids=lambda m: " ".join(mode_argv(m)))
def test_every_flag_the_table_allows_in_a_mode_is_taken(mode: Mode) -> None:
    """No false refusals: each flag that applies to a mode, its conditions met, passes the check;
    and so do all of them at once (but --no-check, which the check flags' condition excludes)."""
    ap = export.build_parser()

    def passes(argv: list[str]) -> None:
        args = ap.parse_args([*mode_argv(mode), *argv])
        export.refuse_no_effect(ap, args, args.precision or ["fp16"])

    rows = [(dests, scope) for dests, scope in APPLIES if mode in scope.modes]
    for dests, scope in rows:
        for dest in set(dests) - {"format", "bundle"}:
            passes([*(a for n in scope.needs for a in NEED_HOLDS[n]), *typed(dest)])
    passes([*(a for _, scope in rows for n in scope.needs for a in NEED_HOLDS[n]),
            *(a for dests, _ in rows for d in dests if d not in ("format", "bundle", "no_check") for a in typed(d))])


def test_flags_refused_for_one_reason_are_named_together(no_work: None, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    error, fix = refusal(["--format", "trt", "--bundle", "b", "--weights", "w.pth", "--opset", "18", "--json"],
                         tmp_path, capsys)
    assert error.startswith("error: --weights, --opset have no effect here: nothing is exported (--bundle)"), error
    assert fix.endswith("or drop --weights, --opset"), fix


@pytest.mark.parametrize("argv, words", [
    (["--bundle", "b"], ["--bundle BUNDLE builds TensorRT engines from an existing bundle", "add --format trt"]),
    (["--format", "triton", "--opset", "18"], ["--format triton writes a model repository (--out) from an exported "
                                               "bundle (--bundle)", "cvt-export --format triton --bundle build/b"]),
])
def test_what_is_no_mode_is_refused_first(no_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], words: list[str]) -> None:
    error, fix = refusal(argv, tmp_path, capsys)
    assert words[0] in error and words[1] in fix, (error, fix)


# --- (c) --help: the groups in order, each saying when it applies --------------------------------

def test_help_shows_the_groups_in_order_with_when_they_apply() -> None:
    assert [title for title, _ in GROUPS] == [
        "model to export", "what to write", "checks and timing", "int8", "TensorRT engines (--format trt, trt-rtx)",
        "Triton (--format triton)", "DeepStream (--format deepstream)", "output"]
    text = export.build_parser().format_help()
    at = [text.index(f"\n{title}:\n") for title, _ in GROUPS]
    assert at == sorted(at) and at[0] > text.index("\noptions:\n")
    for (title, description), start in zip(GROUPS, at):
        assert text[start:].split("\n", 3)[2].strip() == description.split("\n")[0], title
    sections = dict(zip((t for t, _ in GROUPS), (text[a:b] for a, b in zip(at, [*at[1:], text.index("\nexamples:")]))))
    for group in export.build_parser()._action_groups:  # each flag under its own group's heading
        for action in group._group_actions if group.title in sections else ():
            assert f"\n  {action.option_strings[0]}" in sections[str(group.title)], (group.title, action.dest)
