"""Work across cores, one tensor per task: encoding and decoding run in a thread pool, results kept in order.

Threads, not processes: the coders' numba kernels release the GIL (``nogil=True``), numpy's sorts and
torch's kernels do too, and threads share the model instead of copying it. Results come back in the
order the items were given (a file is written in name order, whichever tensor finishes first), and
only ``workers`` of them are computed ahead, so memory holds a bounded number of tensors.

Each thread allocates from an arena of its own, and glibc gives an arena's freed pages back to the OS
only from its top: after a few tensors, their freed temporaries would stay resident beside the next
ones' (0.8 GB after quantizing GPT-2 medium's 355M weights). ``release_free_memory`` hands them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TypeVar

from .errors import ConfigError

Item = TypeVar("Item")
Result = TypeVar("Result")


def worker_count(workers: int | None) -> int:
    """``workers`` checked (an integer >= 1), or for None the CPUs this process may run on.

    Raises:
        ConfigError: ``workers`` is not an integer >= 1 or None.
    """
    if workers is None:
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1 or None (every CPU), got {workers!r}")
    return workers


def map_in_order(fn: Callable[[Item], Result], items: Iterable[Item], workers: int | None = None, *,
                 release_memory: bool = False) -> Iterator[Result]:
    """``fn(item)`` for each item, in order, with up to ``workers`` calls running at once.

    At most ``workers`` results wait beside the one being consumed. The first exception is raised when
    its item's turn comes; calls not yet started are cancelled (running ones finish first).
    ``release_memory``: ``release_free_memory`` once each result has been consumed (large items).
    """
    workers = worker_count(workers)
    if workers == 1:
        for item in items:
            yield fn(item)
            if release_memory:
                release_free_memory()
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deepshrink")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
                if release_memory:
                    release_free_memory()
        while pending:
            yield pending.popleft().result()
            if release_memory:
                release_free_memory()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def map_unordered(fn: Callable[[Item], Result], items: Iterable[Item], workers: int | None = None, *,
                  release_memory: bool = False) -> Iterator[tuple[Item, Result]]:
    """``(item, fn(item))`` as each call finishes, up to ``workers`` calls running at once (started in the
    order given: put the longest first, and the others fill the remaining threads around it). The first
    exception is raised as soon as its call finishes; calls not yet started are cancelled."""
    workers = worker_count(workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deepshrink")
    running: dict = {}
    try:
        for item in items:
            if len(running) == workers:
                yield from _finished(running, release_memory)
            running[pool.submit(fn, item)] = item
        while running:
            yield from _finished(running, release_memory)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finished(running: dict, release_memory: bool) -> Iterator[tuple]:
    done, _ = wait(running, return_when=FIRST_COMPLETED)
    for future in done:
        yield running.pop(future), future.result()
        if release_memory:
            release_free_memory()


def release_free_memory() -> None:
    """Give the allocator's free pages back to the OS: glibc's ``malloc_trim(0)`` (a millisecond or two),
    which walks every arena; nothing where the C library has no such call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
