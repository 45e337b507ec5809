"""Progress bars for the long-running commands (`disagg bench`, `compare`, `soak`), shown
only on a terminal so that CI logs stay as they were.

    with progress(total=200, desc="concurrency 16") as bar:   # stderr by default
        ...
        bar.update()                                          # one more request done

`progress()` returns a `Progress`: a tqdm bar on `stream` when `enabled` is True, or when
it is None (the default: the commands' `--progress/--no-progress` left unset) and `stream`
is a terminal; otherwise a silent counter with the same `update(n)` / `update_to(n)` /
`note(text)` / `close()`, so the code that counts does not care which. It is safe to
update from worker threads. Bars go to stderr and reports to stdout; `echo()` prints a
line without tearing a bar that is on the same terminal (tqdm clears it and draws it
again below), and is a plain print when no bar is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

_shown_lock = threading.Lock()
_shown = 0  # bars on screen now (echo steps around them only then)


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is attached to a terminal (False for files, pipes, closed streams)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (ValueError, OSError):  # closed, or no file descriptor behind it
        return False


def _size(stream: Any) -> tuple[int, int]:
    """The terminal's (columns, lines), (0, 0) when it does not say."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # no file descriptor, closed, not a terminal
        return 0, 0
    return size.columns, size.lines


class Progress:
    """A count of finished work, drawn as a tqdm bar when shown (see the module doc).

    `leave`: keep the finished bar on screen; None (default) keeps it only when it is the
    outermost bar, so a per-level bar under a command's own bar clears when its level ends.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        *,
        unit: str = "req",
        leave: bool | None = None,
    ) -> None:
        global _shown
        out = sys.stderr if stream is None else stream
        self.total = total
        self.n = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        if is_terminal(out) if enabled is None else enabled:
            columns, lines = _size(out)
            # Follow a terminal's resizes; one that reports no size (a fresh pty, a fake) gets
            # 80x24, as tqdm hides the bars of a screen of 0 lines.
            shape = {"dynamic_ncols": True} if columns > 0 and lines > 0 else {"ncols": 80, "nrows": 24}
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=out, leave=leave, **shape)
            with _shown_lock:
                _shown += 1

    @property
    def shown(self) -> bool:
        """Whether a bar is on screen (not closed, and not a silent counter)."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """`n` more done."""
        with self._lock:
            self.n += n
            if self._bar is not None:
                self._bar.update(n)

    def update_to(self, n: int) -> None:
        """`n` done in all (a count polled from elsewhere); never counts down. Also redraws
        the elapsed time when nothing new finished."""
        with self._lock:
            step = max(0, n - self.n)
            self.n += step
            if self._bar is not None:
                self._bar.update(step)

    def note(self, text: str, refresh: bool = True) -> None:
        """A short status after the counts (e.g. "3 errors"): drawn now, or with the next
        update if not `refresh`."""
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(text, refresh=refresh)

    def close(self) -> None:
        """Draw the final state (a bar) and stop; later updates only count. Idempotent."""
        global _shown
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()
            with _shown_lock:
                _shown -= 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def progress(
    total: int | None,
    desc: str = "",
    stream: TextIO | None = None,
    enabled: bool | None = None,
    *,
    unit: str = "req",
    leave: bool | None = None,
) -> Progress:
    """A bar on `stream` (default stderr) if it is a terminal or `enabled`, else a silent
    counter; `enabled=False` never draws. Use it as a context manager, or `close()` it."""
    return Progress(total, desc, stream, enabled, unit=unit, leave=leave)


def echo(text: str, file: TextIO | None = None) -> None:
    """`print(text, file=file, flush=True)` (default stdout) that leaves the bars on the
    terminal intact: with a bar shown, tqdm clears the bars, writes, and redraws them."""
    out = sys.stdout if file is None else file
    with _shown_lock:
        shown = _shown > 0
    if shown:
        tqdm.write(text, file=out)
        out.flush()
    else:
        print(text, file=out, flush=True)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """`--progress` / `--no-progress`; unset (None) means: only when stderr is a terminal."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: only when stderr is a terminal, so not in CI logs)",
    )
