"""Python's cyclic garbage collector held off while autocut builds graphs.

Tracing, probing and building a body make hundreds of thousands of short-lived objects (fx nodes,
proxies, meta tensors); each few hundred allocations start a collection that walks the young
objects again, and every few of those a full one over every object the process holds (torch's
and timm's modules included). Paused, the young objects are collected once, at the end.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Within the block (or the decorated function), no automatic collection; after it, one
    collection of the youngest generation, which holds everything the block made (nothing is
    promoted while the collector is off), so the cycles it left (fx graphs) are freed then and
    not promoted; the older generations are left to their own schedule (collecting them walks
    every object a model built just before holds: 0.7 ms for efficientnet_b0, more than a
    remembered body takes to make). A block inside another, or where the collector is already
    off, changes nothing.

    Example:
        >>> @gc_paused()
        ... def discover(model): ...
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)
