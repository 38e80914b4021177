"""Progress bars and phase lines on stderr (bars only on a terminal, phase lines always)."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _bars_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("PRUNE2TVM_NO_PROGRESS")


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    if not _bars_enabled():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def phase(name: str, detail: str = "") -> Iterator[None]:
    """Announce a phase, and its duration when it ends."""
    say(f"[{name}] {detail}".rstrip())
    start = time.perf_counter()
    yield
    say(f"[{name}] done in {time.perf_counter() - start:.1f} s")
