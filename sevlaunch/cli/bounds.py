"""argparse types for numeric options with a range, so that an out-of-range value is refused while the
command line is parsed, before any work, with the option's name and its range."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_in(low: int, high: int, *, hex_ok: bool = True) -> Callable[[str], int]:
    """An argparse `type=` accepting an integer in [low, high]: decimal, or 0x-prefixed hex with
    `hex_ok`. argparse prefixes the message with the option ("argument --vcpus: ...")."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0) if hex_ok else int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be at least {low} and at most {high}, got {text}")
        return value

    parse.__name__ = f"integer {low}..{high}"  # argparse names the type in some messages
    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse `type=` accepting a finite number in (low, high] (a duration: zero is not one)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low < value <= high:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"must be more than {low:g} and at most {high:g}, got {text}")
        return value

    parse.__name__ = f"number {low:g}..{high:g}"
    return parse
