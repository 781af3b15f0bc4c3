"""The benchmarks' comma-separated number flags: parsed lists, and a bad list refused by argparse (exit 2)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from arglists import floats, ints  # noqa: E402


def test_lists_parse_and_skip_empty_items() -> None:
    assert floats("2.5,3") == [2.5, 3.0]
    assert floats("") == []
    assert ints("8,4,,3") == [8, 4, 3]
    assert floats("auto,0.5", words=("auto",)) == ["auto", 0.5]


@pytest.mark.parametrize(("parse", "text"), [(floats, "2,x"), (ints, "1.5"), (ints, "a")])
def test_bad_list_names_the_text(parse, text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"'{text}' is not a list of"):
        parse(text)


@pytest.mark.parametrize(
    ("script", "flag", "text", "data", "what"),
    [
        ("resnet8_cifar10.py", "--ram-targets", "2.5,q", ["--data", "/no/such.npz"], "numbers like 2.5,3"),
        ("lenet5_front.py", "--cmsis-ram-targets", "3,y", ["--data", "/no/such.npz"], "numbers like 2.5,3"),
        ("lenet5_prune.py", "--prune", "auto,zz", ["--data", "/no/such.npz"], "numbers like 2.5,3 or auto"),
        ("lowbit_qat.py", "--bits", "2,x", [], "whole numbers like 8,4,3"),
        ("digits_channels.py", "--fixed", "0.5,half", [], "numbers like 2.5,3"),
    ],
)
def test_benchmark_refuses_a_bad_list_before_any_work(
    script: str, flag: str, text: str, data: list, what: str
) -> None:
    """Exit 2 and argparse's error naming the flag, before the data checks or any training."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *data, flag, text],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"{script}: error: argument {flag}: '{text}' is not a list of {what}"
    assert "no CIFAR-10" not in r.stderr and "no MNIST" not in r.stderr


def test_resnet8_refuses_a_prune_fraction_outside_0_1_before_the_data_check() -> None:
    script = ROOT / "benchmarks" / "resnet8_cifar10.py"
    r = subprocess.run(
        [sys.executable, str(script), "--data", "/no/such.npz", "--prune-channels", "0.25,1.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    want = "error: --prune-channels 1.5: use fractions in (0, 1), e.g. 0.25"
    assert r.stderr.strip().splitlines()[-1] == want


def test_resnet8_pruned_only_needs_a_prune_fraction() -> None:
    script = ROOT / "benchmarks" / "resnet8_cifar10.py"
    r = subprocess.run(
        [sys.executable, str(script), "--data", "/no/such.npz", "--pruned-only"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == "error: --pruned-only needs --prune-channels F (the fraction to prune)"
    )


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--fixed", "0.5,1"], "--fixed 1"),
        (["--budget", "80"], "--budget 80"),
        (["--rerender", "--out", "/no/such/dir"], "no results at /no/such/dir/digits_channels.json"),
    ],
)
def test_digits_channels_refuses_bad_shares_and_budgets_before_training(flags: list, says: str) -> None:
    script = ROOT / "benchmarks" / "digits_channels.py"
    r = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {says}")
