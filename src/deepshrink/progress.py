"""A progress bar per tensor for long steps (writing and loading a file), as ``train.py`` shows its epochs.

Shown on stderr (stdout stays free for the CLI's tables) only when asked for and stderr is a terminal;
the CLI's ``--quiet`` turns it off. A disabled bar prints nothing and costs nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def shown(enabled: bool) -> bool:
    """Whether a bar asked for (``enabled``) is drawn: only on a terminal."""
    return bool(enabled) and sys.stderr.isatty()


@contextmanager
def tensor_progress(what: str, total: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A bar of ``total`` tensors labelled ``what``; yields ``advance(name)``, called as each tensor is done."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}"),
        console=Console(stderr=True),
        disable=not shown(enabled),
        transient=True,
    )
    with bar:
        task = bar.add_task(what, total=total, tensor="")

        def advance(name: str) -> None:
            bar.update(task, advance=1, tensor=name)

        yield advance
