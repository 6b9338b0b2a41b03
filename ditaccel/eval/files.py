"""Writing results so that an interruption never leaves a mix of two runs.

- :func:`atomic_path` / :func:`write_json_atomic`: one file replaced in one rename;
- :class:`FileSet`: a whole directory of outputs (results.json, results.csv, figures, report.html)
  written into a staging directory beside the target and swapped in at :meth:`FileSet.commit` with
  SIGINT/SIGTERM held off, so the target holds either every file of the previous run or every file
  of this one. A run killed before the commit leaves the target as it was (and its staging
  directory, with the progress so far, for inspection).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from .record import write_json


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(data: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        write_json(data, tmp)
    return Path(path)


@contextmanager
def _signals_held():
    """Defer SIGINT/SIGTERM until the block is done (main thread, POSIX); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class FileSet:
    """Outputs of one run, staged beside ``target`` and swapped in whole by :meth:`commit`."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        self.committed = False

    def _old(self) -> Path:
        return self.target.parent / f".{self.target.name}.old-{os.getpid()}"

    def _recover(self) -> None:
        """A swap cut short by a hard kill (between its two renames): put the previous set back."""
        if self.target.exists():
            return
        for old in sorted(self.target.parent.glob(f".{self.target.name}.old-*")):
            os.replace(old, self.target)
            return

    def path(self, name: str) -> Path:
        """Where to write ``name`` now (inside the staging directory)."""
        return self.staging / name

    def final(self, path) -> str:
        """The path a staged file will have once committed."""
        path = Path(path)
        try:
            return str(self.target / path.relative_to(self.staging))
        except ValueError:
            return str(path)

    def commit(self) -> Path:
        """Swap the staged set in (the previous run's files go, all together)."""
        with _signals_held():
            old = self._old()
            if self.target.exists():
                os.replace(self.target, old)
            os.replace(self.staging, self.target)
            self.committed = True
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        if not self.committed and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)


__all__ = ["FileSet", "atomic_path", "write_json_atomic"]
