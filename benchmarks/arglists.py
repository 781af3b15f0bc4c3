"""Comma-separated number flags for the benchmarks' argparse: '2.5,3' -> [2.5, 3.0], bad text -> exit 2."""

from __future__ import annotations

import argparse


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of {what}") from None


def floats(text: str) -> list[float]:
    """'2.5,3' -> [2.5, 3.0]; '' -> []. argparse turns a bad list into its usage line and exit 2."""
    return _numbers(text, float, "numbers like 2.5,3")


def ints(text: str) -> list[int]:
    """'8,4,3' -> [8, 4, 3]; '' -> []. argparse turns a bad list into its usage line and exit 2."""
    return _numbers(text, int, "whole numbers like 8,4,3")
