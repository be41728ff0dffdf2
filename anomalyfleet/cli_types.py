"""Argument types shared by every command line entry point (argparse `type=` callables)."""

from __future__ import annotations

import argparse


class CommandParser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one line naming the problem and where help is,
    instead of the whole usage block before it (subcommand parsers inherit the class)."""

    def error(self, message: str):
        # Leftover arguments are reported by the top-level parser: point at the subcommand's help.
        where = "the command's --help" if message.startswith("unrecognized arguments") else f"{self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message} (see {where})\n")


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {value}")
    return value


def smoothing_sigma(text: str) -> float:
    """A Gaussian sigma in pixels: finite and >= 0 (0 turns smoothing off). NaN would otherwise
    pass every comparison and silently switch smoothing off."""
    value = _number(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"sigma must be a finite number >= 0, got {text}")
    return value


def layer_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("at least one layer is needed")
    return values


def in_range(low: float, high: float, what: str, low_open: bool = False, high_open: bool = False):
    """A float type accepting [low, high], with either end open."""

    def parse(text: str) -> float:
        value = _number(text)
        ok_low = value > low if low_open else value >= low
        ok_high = value < high if high_open else value <= high
        if not (ok_low and ok_high):
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{what} must be in {span}, got {value}")
        return value

    return parse
