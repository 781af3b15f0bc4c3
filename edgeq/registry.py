"""Tables of kinds (allocators, storages): adding an entry for the duration of a block."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import TypeVar

from edgeq.errors import EdgeqError

T = TypeVar("T")


@contextmanager
def registered(
    table: MutableMapping[str, T], name: str, entry: T, error: type[EdgeqError], taken: tuple[str, ...] = ()
) -> Iterator[T]:
    """table[name] = entry inside the block, removed after it; `error` when the name is already taken."""
    if name in table or name in taken:
        raise error(f"{name!r} is already in the table")
    table[name] = entry
    try:
        yield entry
    finally:
        table.pop(name, None)
