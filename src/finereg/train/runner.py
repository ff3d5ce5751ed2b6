"""Many fits in parallel worker processes that stop cleanly and never outlive the command.

:func:`run_all` calls ``fn(item)`` for every item, in ``jobs`` spawned worker processes (one thread each), and
hands each result to ``on_result`` as it arrives. ``fn`` runs fits with :func:`check_stop` as their ``on_step``
callback. The contract:

* **SIGINT or SIGTERM to the parent** (Ctrl-C, ``kill``): queued items do not start, running fits save a
  checkpoint after their current step and return; the parent collects them and returns ``interrupted``. A second
  signal sends SIGTERM to the workers: a fit in its training loop still checkpoints after its step, one still
  setting up (nothing to save yet) ends at once.
* **The parent dies** (even by SIGKILL): each worker notices within half a second, sends itself SIGTERM (the
  same clean stop) and exits once its running fit has returned; it never starts another item.
* A terminal's Ctrl-C also reaches the workers, whose fits treat it like the parent's signal.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["run_all", "check_stop", "Signals"]

_STOP: Any = None  # the shared stop event (in the parent too, when it runs the items itself)
_ORPHANED = threading.Event()  # in a worker: the parent is gone
_BUSY = threading.Lock()  # in a worker: held while an item runs


class Signals:
    """While active (main thread only), SIGINT and SIGTERM set ``event`` instead of raising; ``count`` says how
    many arrived and ``on_second`` runs at the second one."""

    def __init__(self, event, on_first: Callable[[], None] = lambda: None, on_second: Callable[[], None] = None):
        self.event, self.count, self.on_first, self.on_second = event, 0, on_first, on_second
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.event.set()
        if self.count == 1:
            self.on_first()
        elif self.on_second is not None:
            self.on_second()

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stopping() -> bool:
    """Whether the items should stop: the stop event is set, or (in a worker) the parent is gone."""
    return _ORPHANED.is_set() or (_STOP is not None and _STOP.is_set())


def check_stop(_info: Any = None) -> None:
    """``on_step`` callback of the fits: raises ``KeyboardInterrupt`` (the fit checkpoints and returns) when
    :func:`stopping`."""
    if stopping():
        raise KeyboardInterrupt


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    _ORPHANED.set()
    os.kill(os.getpid(), signal.SIGTERM)  # a fit in training checkpoints after its step; otherwise the worker ends
    with _BUSY:  # ... and once that fit has returned, the worker ends before it could take another item
        os._exit(0)


def _init_worker(stop, parent: int) -> None:
    global _STOP
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outside a fit; a fit handles Ctrl-C itself (checkpoint, stop)
    _STOP = stop
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="finereg-parent-watch").start()


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    with _BUSY:
        return None if stopping() else fn(item)


def run_all(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    jobs: int,
    on_result: Callable[[Any], bool | None],
    log: Callable[[str], None] = print,
) -> bool:
    """Run ``fn`` on every item (``jobs`` processes; ``jobs == 1``: in this process), calling ``on_result`` with each
    non-``None`` result (a true return value stops the remaining items). Returns whether it was interrupted."""
    global _STOP
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    items = list(items)
    say_stop = lambda: log(  # noqa: E731
        "\nstopping: the running fits save a checkpoint after their step (signal again to end them sooner)"
    )
    if jobs == 1:
        _STOP = stop
        try:
            with Signals(stop, on_first=say_stop):
                for item in items:
                    result = None if stopping() else fn(item)
                    if result is not None and on_result(result):
                        stop.set()
            return stop.is_set()
        finally:
            _STOP = None
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(stop, os.getpid()))

    def end_workers() -> None:
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()

    with Signals(stop, on_first=say_stop, on_second=end_workers):
        try:
            pending = {pool.submit(_call, fn, item) for item in items}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.cancelled():
                        continue
                    try:
                        result = fut.result()
                    except BrokenProcessPool:  # a worker ended by a signal while setting up a fit
                        stop.set()
                        continue
                    if result is not None and on_result(result):
                        stop.set()
                if stop.is_set():
                    for fut in pending:
                        fut.cancel()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return stop.is_set()
