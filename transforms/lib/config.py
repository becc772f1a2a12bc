"""Command-line flags stated once: on the fields of a config dataclass.

A field declared with `flag(default, help, ...)` is its own flag: the flag is `--<field name>`, its
default the field's, its type read from the annotation (`int`, `float`, `str`, `X | None`; a tuple
is a repeatable flag), its help and any other argparse keyword (choices, action, required) kept in
the field's metadata. `add_flags` turns a config class into its parser's arguments, so a default or
a help text is never written twice (`cm3corpus build`'s BuildConfig, `cm3corpus train`'s TrainConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float}


def flag(default: Any = dataclasses.MISSING, help: str | None = None, **argparse_options: Any) -> Any:  # noqa: A002
    """A dataclass field that is also a flag: `help` and `argparse_options` (choices, action, ...) go to argparse."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


def add_flags(parser: argparse.ArgumentParser, cls: type, required: bool = True) -> None:
    """Add one flag per field of the dataclass `cls`, in field order.

    Args:
        parser: the parser (or Beam's options parser) to add to.
        cls: a dataclass whose annotations are strings (`from __future__ import annotations`).
        required: whether a field without a default is an argparse-required flag; False leaves the
            check to the caller (Beam parses every registered options class for every pipeline).
    """
    for f in dataclasses.fields(cls):
        options = dict(f.metadata)
        kind = str(f.type)
        if kind.startswith("tuple["):  # repeatable; an unset flag is None, the caller makes it a tuple
            options.setdefault("action", "append")
        elif kind == "bool":
            options.setdefault("action", argparse.BooleanOptionalAction)
            options.setdefault("default", f.default)
        else:
            base = kind.removesuffix(" | None")
            if base in _TYPES and "choices" not in options:
                options.setdefault("type", _TYPES[base])
            if f.default is not dataclasses.MISSING:
                options.setdefault("default", f.default)
            elif required:
                options.setdefault("required", True)
        parser.add_argument(f"--{f.name}", **options)
