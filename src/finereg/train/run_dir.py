"""The life cycle of a run directory: new, resumed or overwritten, held exclusively by one process.

A run directory holds what one :func:`~finereg.train.loop.fit` writes: ``last.pt`` / ``prev.pt`` (checkpoints),
``metrics.csv``, ``metrics.jsonl``, ``config.json``, ``wise_ft.csv`` / ``wise_ft.json`` (``finereg wise-ft``),
TensorBoard events in ``tb/`` and the marker ``.finereg-run``.
The contract:

* **Nothing else is ever deleted.** A new run goes into a missing or empty directory, or into one that holds a
  finereg run (its marker, or a finereg checkpoint); a directory holding anything else is refused. ``overwrite``
  replaces a previous run by deleting only the files listed above, and only once the new run's data, model and
  methods are set up (:meth:`RunDir.begin`), so bad input leaves the previous run intact.
* **One process at a time.** The directory is locked (``flock`` on ``.finereg-lock``, released by the operating
  system if the process dies) from before anything is read until the run ends; a second ``fit``, ``--resume`` or
  ``--overwrite`` on it fails at once, naming the process that holds it.
* **A failed start leaves no trace**: a directory that the run created is removed again if the run fails before
  writing into it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .._checks import FineregError
from .checkpoint import LAST, PREV, CheckpointError, find_checkpoint, load_checkpoint

__all__ = [
    "RunDir",
    "RunDirError",
    "DirLock",
    "bench_dir",
    "MARKER",
    "BENCH_MARKER",
    "LOCK",
    "RUN_FILES",
    "WISE_FT_FILES",
]

MARKER = ".finereg-run"
BENCH_MARKER = ".finereg-bench"
LOCK = ".finereg-lock"
CORRUPT = f"{LAST}.corrupt"
WISE_FT_FILES = ("wise_ft.csv", "wise_ft.json", "wise_ft.pt")  # finereg wise-ft's results and model: the run's
RUN_FILES = (LAST, PREV, CORRUPT, "metrics.csv", "metrics.jsonl", "config.json", *WISE_FT_FILES, MARKER)
TB = "tb"
_TB_EVENTS = "events.out.tfevents."


class RunDirError(FineregError):
    """A run directory that cannot be used as asked (busy, not a run, already holding one)."""


# ---------------------------------------------------------------------------------------------------- lock
try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False


class DirLock:
    """An exclusive lock on a directory for the life of a process's use of it (``.finereg-lock``).

    The lock file names its holder (process id, host, command, start time); the operating system releases the lock
    when the holder dies, so a killed run never leaves the directory locked.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run directory"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK

    def acquire(self) -> DirLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                holder = _read_fd(fd)
                os.close(fd)
                raise RunDirError(
                    f"{self.what} {str(self.folder)!r} is in use by another finereg process ({holder}); wait for "
                    "it to finish (or stop it), or choose another directory"
                )
            try:  # the previous holder may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)) or "python",
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting process re-checks the inode
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_fd(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, '{info['command']}', since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


# ----------------------------------------------------------------------------------------------- run dir
def _is_finereg_checkpoint(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a finereg run: its marker, or (runs of finereg 0.1) a finereg checkpoint."""
    return (folder / MARKER).is_file() or any(
        (folder / n).is_file() and _is_finereg_checkpoint(folder / n) for n in (LAST, PREV)
    )


class RunDir:
    """A run directory held for the life of one run (see the module docstring).

    ``RunDir(path, resume=..., overwrite=...)`` checks and locks it (``lock=False`` on the non-main processes
    of a distributed run, which only read); :meth:`begin` makes it the new run's (after set-up); :meth:`close`
    releases it. ``checkpoint`` is the loaded checkpoint when resuming.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume: str | os.PathLike | None = None,
        overwrite: bool = False,
        lock: bool = True,
    ):
        self._lock: DirLock | None = None
        self._created = False
        self.checkpoint: dict | None = None
        self.resumed_from: Path | None = None
        self.path = Path(path).expanduser() if resume is None else self.folder_of(resume)
        try:
            if resume is not None:
                src = Path(resume).expanduser()
                if not self.path.is_dir():
                    find_checkpoint(src)  # the clear "does not exist" error
                self._hold(lock)
                self.resumed_from = find_checkpoint(src)
                self.checkpoint = load_checkpoint(src)
            else:
                self._new(overwrite, lock)
        except BaseException:
            self.close(failed=True)
            raise

    @staticmethod
    def folder_of(resume: str | os.PathLike) -> Path:
        """The run directory of ``--resume`` (a run directory, or a checkpoint file in one)."""
        src = Path(resume).expanduser()
        return src if src.is_dir() or not src.suffix else src.parent

    def _hold(self, lock: bool) -> None:
        if lock:
            self._lock = DirLock(self.path).acquire()

    def _new(self, overwrite: bool, lock: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {str(self.path)!r} is a file, not a directory; choose a directory for the run")
        if lock:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        self._hold(lock)
        if not lock:
            return
        entries = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        if not entries:
            return
        if not holds_run(self.path):
            shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "")
            raise RunDirError(
                f"{str(self.path)!r} is not empty and holds no finereg run ({shown}); finereg writes a run only "
                "into a new or empty directory, or over a finereg run. Choose another --out"
            )
        existing = [n for n in (LAST, PREV) if (self.path / n).exists()]
        if existing and not overwrite:
            raise RunDirError(
                f"{str(self.path)!r} already holds a run ({', '.join(existing)}). Continue it with --resume, start "
                "over with --overwrite (deletes that run's files only), or choose another --out"
            )
        self._old_run_files()  # what --overwrite would refuse is refused now, before any set-up

    def begin(self, log=print) -> None:
        """The run starts writing: a new run removes the previous run's files (only those a run writes) and
        writes the marker; a resumed run sets a corrupt ``last.pt`` aside (``last.pt.corrupt``) when it resumes
        from ``prev.pt``, so that the next checkpoint does not rotate it over the intact one."""
        if self.checkpoint is None:
            for p in self._old_run_files():  # every check first: nothing is deleted unless all of it can be
                p.unlink()  # a link is removed as a link, never followed
            tb = self.path / TB
            if tb.is_dir() and not any(tb.iterdir()):  # a linked tb/ was unlinked above
                tb.rmdir()
        else:
            last = self.path / LAST
            if last.exists() and self.resumed_from is not None and self.resumed_from.resolve() != last.resolve():
                try:
                    load_checkpoint(last)
                except CheckpointError:
                    os.replace(last, self.path / CORRUPT)
                    log(f"{last} is unreadable: kept as {CORRUPT}")
        (self.path / MARKER).write_text(json.dumps({"format": "finereg-run-v1"}) + "\n")
        self._created = False  # it holds a run now

    def _old_run_files(self) -> list[Path]:
        """The files of the previous run that a new run replaces, after checking that each can be removed as a
        file: a directory where a run writes a file, or a ``tb`` that is a file, is refused before anything is
        deleted. A symbolic link (``tb/`` included) is listed as itself: its target, inside or outside the run
        directory, is never touched."""
        found: list[Path] = []

        def plain_file(p: Path) -> bool:
            if p.is_symlink():
                return True
            if p.is_dir():
                raise RunDirError(
                    f"{str(p)!r} is a directory where a finereg run keeps a file; move it away (nothing was "
                    "deleted), or choose another --out"
                )
            return p.exists()

        found += [p for p in (self.path / n for n in RUN_FILES) if plain_file(p)]
        tb = self.path / TB
        if tb.is_symlink():
            found.append(tb)
        elif tb.exists():
            if not tb.is_dir():
                raise RunDirError(
                    f"{str(tb)!r} is a file where a finereg run keeps its TensorBoard folder; move it away "
                    "(nothing was deleted), or choose another --out"
                )
            found += [p for p in sorted(tb.iterdir()) if p.name.startswith(_TB_EVENTS) and plain_file(p)]
        return found

    def close(self, *, failed: bool = False) -> None:
        """Release the directory; after a failed start, remove it again if this run created it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if failed and self._created:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


@contextmanager
def bench_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Hold a bench's output directory (``finereg bench --out``) for the bench's life: new or empty, or a finereg
    bench's (marker ``.finereg-bench``, so a rerun finishes it); locked like a run directory."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {str(path)!r} is a file, not a directory; choose a directory for the bench")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with DirLock(path, "bench directory"):
            entries = sorted(p.name for p in path.iterdir() if p.name != LOCK)
            if entries and not (path / BENCH_MARKER).is_file():
                shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "")
                raise RunDirError(
                    f"{str(path)!r} is not empty and holds no finereg bench ({shown}); choose a new or empty --out "
                    "(or the directory of an earlier bench, to finish it)"
                )
            (path / BENCH_MARKER).write_text(json.dumps({"format": "finereg-bench-v1"}) + "\n")
            created = False
            yield path
    finally:
        if created:
            try:
                path.rmdir()
            except OSError:
                pass
