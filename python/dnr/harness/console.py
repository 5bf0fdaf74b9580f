"""Console output of the harness: progress lines on stdout and tqdm bars on stderr."""

from __future__ import annotations

import sys

__all__ = ["ConsoleLog"]


class ConsoleLog:
    """Progress lines on stdout (off in quiet mode) and tqdm bars on stderr (when tqdm is installed and
    stderr is a terminal: redirected logs get the per-epoch lines only)."""

    def __init__(self, quiet: bool, progress: bool):
        self.quiet = quiet
        self.tqdm = None
        if progress and not quiet and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def bar(self, **kwargs):
        """A tqdm bar on stderr, or None when bars are off."""
        if self.tqdm is None:
            return None
        return self.tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)
