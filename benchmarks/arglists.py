"""Comma-separated number flags for the benchmarks' argparse: '2.5,3' -> [2.5, 3.0], bad text -> exit 2."""

from __future__ import annotations

import argparse


def _numbers(text: str, kind: type, what: str, words: tuple[str, ...]) -> list:
    try:
        return [item if item in words else kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        also = "".join(f" or {w}" for w in words)
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of {what}{also}") from None


def floats(text: str, words: tuple[str, ...] = ()) -> list[float | str]:
    """'2.5,3' -> [2.5, 3.0]; '' -> []; items in words stay strings. argparse turns a bad list into its
    usage line and exit 2."""
    return _numbers(text, float, "numbers like 2.5,3", words)


def ints(text: str) -> list[int]:
    """'8,4,3' -> [8, 4, 3]; '' -> []. argparse turns a bad list into its usage line and exit 2."""
    return _numbers(text, int, "whole numbers like 8,4,3", ())
