"""deploy.boards: board profiles as data, sizes, and the fit check."""

from __future__ import annotations

import pytest

from deploy.boards import (
    Board,
    BoardError,
    fit_check,
    known_boards,
    load_board,
    parse_size,
)
from deploy.device.flash import FLASH_TOOLS
from deploy.firmware import FLAVOURS
from edgeq.errors import EdgeqError

EXPECTED = {
    # name: (flash, ram, clock, core)
    "nrf52840": (1024**2, 256 * 1024, 64_000_000, "cortex-m4f"),
    "nrf52832": (512 * 1024, 64 * 1024, 64_000_000, "cortex-m4f"),
    "stm32f746": (1024**2, 320 * 1024, 216_000_000, "cortex-m7"),
    "esp32s3": (8 * 1024**2, 512 * 1024, 240_000_000, "xtensa-lx7"),
    "rp2040": (2 * 1024**2, 264 * 1024, 133_000_000, "cortex-m0plus"),
    "generic-cortex-m4": (1024**2, 256 * 1024, 100_000_000, "cortex-m4"),
    "mps2-an386": (4 * 1024**2, 4 * 1024**2, 25_000_000, "cortex-m4f"),
}


def test_known_boards():
    assert set(known_boards()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_profile_loads_and_is_sane(name):
    b = load_board(name)
    assert isinstance(b, Board) and b.name == name
    assert (b.flash_bytes, b.ram_bytes, b.clock_hz, b.core) == EXPECTED[name]
    assert 0 <= b.app_allowance_bytes < b.flash_bytes and 0 < b.stack_allowance_bytes < b.ram_bytes
    assert (b.simulator is None) == (b.app_allowance_bytes > 0)  # a virtual board runs only edgeq's ELF
    assert b.templates and set(b.templates) <= set(FLAVOURS)
    assert b.flash_tool in FLASH_TOOLS and any("{image}" in a or "{build}" in a for a in b.flash_args)


def test_nrf52840_budgets():
    b = load_board("NRF52840 ")
    assert b.app_allowance_bytes == 32 * 1024 and b.stack_allowance_bytes == 16 * 1024
    assert b.firmware_flash_budget == 1024**2 - 32 * 1024 and b.arena_budget == 240 * 1024
    assert "arduino" in b.templates and b.flash_tool == "pyocd"


def test_unknown_board_lists_known_ones():
    with pytest.raises(BoardError) as e:
        load_board("arduino-uno")
    msg = str(e.value)
    assert "unknown board 'arduino-uno'" in msg and all(n in msg for n in EXPECTED)
    assert isinstance(e.value, EdgeqError)


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("256KB", 262_144),
        ("256KiB", 262_144),
        ("256 kb", 262_144),
        ("1MiB", 1_048_576),
        ("1MB", 1_048_576),
        ("1.5MiB", 1_572_864),
        ("90000B", 90_000),
        ("90000", 90_000),
        ("90_000", 90_000),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "KB", "12 parsecs", "-5KB", "1.5B", "0x100", "1e3", True, None, 2.5, -1])
def test_parse_size_rejects(bad):
    with pytest.raises(BoardError):
        parse_size(bad)


def test_fit_check_fits_with_margins():
    b = load_board("nrf52840")
    r = fit_check(b, 300_112, 26_000)
    assert r.fits
    assert r.flash_margin == b.firmware_flash_budget - 300_112 and r.ram_margin == b.arena_budget - 26_000
    assert r.message.startswith("fits nrf52840") and "spare" in r.message


def test_fit_check_says_by_how_much_it_misses():
    # DESIGN.md's LeNet-5 4-bit figures: the arena (the unpacked 1024x512 layer) cannot fit 64 KB of RAM.
    b = load_board("nrf52832")
    r = fit_check(b, 300_112, 528_816)
    assert not r.fits
    assert r.ram_margin == b.arena_budget - 528_816 < 0
    assert r.flash_margin == b.firmware_flash_budget - 300_112
    assert r.message.startswith("does not fit nrf52832")
    assert f"{-r.ram_margin:,} B short" in r.message
    flash_only = fit_check(b, b.firmware_flash_budget + 1, 0)
    assert not flash_only.fits and flash_only.flash_margin == -1 and "1 B short" in flash_only.message


def test_fit_check_at_the_exact_limit_fits():
    b = load_board("rp2040")
    assert fit_check(b, b.firmware_flash_budget, b.arena_budget).fits


def test_fit_check_counts_the_kernels_code():
    b = load_board("nrf52840")
    spare = b.firmware_flash_budget - 300_112
    with_code = fit_check(b, 300_112, 26_000, code_bytes=spare + 1)
    assert not with_code.fits and with_code.flash_margin == -1
    assert "300,112 B model + " in with_code.message and "1 B short" in with_code.message
    assert fit_check(b, 300_112, 26_000, code_bytes=spare).fits


def test_fit_check_rejects_negative_sizes():
    with pytest.raises(BoardError):
        fit_check(load_board("esp32s3"), -1, 0)


def test_decode_budget_defaults_from_the_board():
    from deploy.target import DEFAULT_DECODE_BUDGET, load_target

    def decode_budget(text, board):
        return load_target(board, decode_budget=text).decode_budget

    assert decode_budget(None, None) == DEFAULT_DECODE_BUDGET == 16 * 1024
    assert decode_budget("none", "nrf52832") is None
    assert decode_budget("8KiB", "nrf52840") == 8 * 1024
    small = load_board("nrf52832")  # 64 KiB RAM less a 16 KiB allowance: a quarter is 12 KiB
    free = small.ram_bytes - small.stack_allowance_bytes
    assert decode_budget(None, "nrf52832") == free // 4 == 12 * 1024
    assert decode_budget(None, "nrf52840") == 16 * 1024  # capped at the default
    with pytest.raises(BoardError, match="kernel set"):
        load_target(None, kernels="fast")
    assert load_target("nrf52840").kernels == "cmsis-nn" and load_target(None).kernels == "reference"


def test_without_a_decode_budget_the_int8_arena_caps_it_once_the_model_is_known():
    from deploy.target import load_target

    def settled(text, board, arena):
        return load_target(board, decode_budget=text).settle_decode(arena).decode_budget

    assert settled(None, None, 3312) == 3 * 1024  # digits: its int8 model needs 3,312 B of arena
    assert settled(None, None, 900) == 1024  # never below 1 KiB
    assert settled(None, None, 30_192) == 16 * 1024  # LeNet-5: the 16 KiB default stands
    assert settled(None, "nrf52832", 3312) == 12 * 1024  # a board's quarter of its free RAM stands
    assert settled("8KiB", None, 3312) == 8 * 1024  # a budget the user gave is kept
    # a flash budget is what the search must meet: more slices would spend it on RAM
    assert load_target(None, flash_budget="8000B").settle_decode(3312).decode_budget == 16 * 1024
    assert load_target(None, ram_budget="6224B").settle_decode(3312).decode_budget == 3 * 1024
    assert settled("none", None, 3312) is None
    once = load_target(None).settle_decode(3312)
    assert once.int8_arena == 3312 and once.settle_decode(100_000) == once  # settled once, for good
