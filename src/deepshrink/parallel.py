"""Work across cores, one tensor per task: encoding and decoding run in a thread pool, results kept in order.

Threads, not processes: the coders' numba kernels release the GIL (``nogil=True``), numpy's sorts and
torch's kernels do too, and threads share the model instead of copying it. Results come back in the
order the items were given (a file is written in name order, whichever tensor finishes first), and
only ``workers`` of them are computed ahead, so memory holds a bounded number of tensors.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


def map_in_order(fn: Callable[[Item], Result], items: Iterable[Item], workers: int | None = None) -> Iterator[Result]:
    """``fn(item)`` for each item, in order, with up to ``workers`` calls running at once.

    At most ``workers`` results wait beside the one being consumed. The first exception is raised when
    its item's turn comes; calls not yet started are cancelled (running ones finish first).
    """
    workers = worker_count(workers)
    if workers == 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deepshrink")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
