"""Flags stated once: a config dataclass's fields become its argparse flags (transforms/lib/config.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from transforms.lib.config import add_flags, flag


@dataclass(frozen=True)
class _Config:
    name: str = flag(help="a required name")
    inputs: tuple[str, ...] = flag((), "repeatable")
    count: int = flag(3, "how many")
    share: float | None = flag(None, "off when unset")
    mode: str = flag("a", choices=["a", "b"])
    fast: bool = flag(True, "on unless --no-fast")
    grow: bool = flag(False, "a plain switch", action="store_true")


def _parse(argv, required=True):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, _Config, required=required)
    return parser, vars(parser.parse_args(argv))


def test_fields_become_flags_with_their_defaults_types_and_help():
    parser, args = _parse(["--name", "x"])
    assert args == {
        "name": "x",
        "inputs": None,
        "count": 3,
        "share": None,
        "mode": "a",
        "fast": True,
        "grow": False,
    }
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["count"] == "how many" and helps["mode"] is None
    _, args = _parse(
        ["--name=x", "--inputs", "p", "--inputs", "q", "--count=7", "--share=0.5", "--mode=b", "--no-fast", "--grow"]
    )
    assert args == {
        "name": "x",
        "inputs": ["p", "q"],
        "count": 7,
        "share": 0.5,
        "mode": "b",
        "fast": False,
        "grow": True,
    }


@pytest.mark.parametrize("argv", [["--name=x", "--count=many"], ["--name=x", "--mode=c"], ["--name=x", "--share=x"]])
def test_a_value_of_the_wrong_type_or_choice_is_refused(argv):
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parse(argv)


def test_a_field_without_default_is_required_unless_the_caller_checks_it():
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parse([])
    assert _parse([], required=False)[1]["name"] is None
