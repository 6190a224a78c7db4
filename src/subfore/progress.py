"""Progress over cases for long commands (evaluate, predict, probe, fingerprint, preprocess): a bar on a terminal
and one line per finished case with its time, on stderr, so that stdout keeps the command's result."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def bar(total: int, desc: str, enabled: bool = True, unit: str = "case", leave: bool = True):
    """A tqdm bar on stderr, shown on a terminal only (``disable=None``): logs and pipes get no carriage returns."""
    from tqdm import tqdm  # Lightning's own progress-bar dependency

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=None if enabled else True, leave=leave)


def track(items: Iterable[T], what: str, name: Callable[[T], str], enabled: bool = True,
          skipped: dict | None = None) -> Iterator[T]:
    """Yield ``items``; after each, ``WHAT i/n NAME: 12.3 s`` on stderr (and the bar advances). Off when disabled.

    skipped: a dict the caller fills with ``{"why": reason}`` for an item it gave up on; that item's line is then
    ``WHAT i/n NAME: skipped (reason)`` (and the dict is emptied).
    """
    items = list(items)
    shown = bar(len(items), what, enabled, leave=False)  # the per-case lines stay instead
    try:
        for i, item in enumerate(items, 1):
            start = time.perf_counter()
            yield item
            if enabled:
                why = skipped.pop("why", None) if skipped is not None else None
                took = f"skipped ({why})" if why is not None else f"{time.perf_counter() - start:.1f} s"
                line = f"{what} {i}/{len(items)} {name(item)}: {took}"
                if shown.disable:
                    print(line, file=sys.stderr, flush=True)
                else:
                    shown.write(line, file=sys.stderr)
            shown.update()
    finally:
        shown.close()
