"""A long-lived thread on glibc's main malloc arena, to run the pipeline for other threads.

coglet calls ``predict()`` on threads of its own. Such a thread gets a malloc arena of its
own, and an arena other than the main one maps every block over 64 MB afresh whatever
``mallopt`` says, so each CPU forward page-faults its activations again (4.5 M faults and
14-21 s instead of 10.6 s for golden photo 01 at baseline, measured through the server).
``MALLOC_ARENA_MAX=1`` at process start avoids that, but a deployment may not set it.
``ComputeThread`` is started in ``setup()``, finds a thread that glibc put on the main
arena, and runs each request's pipeline call there while the calling thread waits.

A cancel that coglet raises in the waiting thread (an asynchronous exception) is passed on
to the compute thread, which stops at its next Python bytecode, as it would have had the
call run in the waiting thread itself.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.05  # the waiting thread wakes this often, so that an injected cancel is raised


def on_main_arena() -> bool:
    """Whether the calling thread's malloc serves from glibc's main arena (the brk ``[heap]``)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pointer = libc.malloc(4096)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith("[heap]"):
                    start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
                    return start <= pointer < end
        return False
    finally:
        libc.free(pointer)


class _Job:
    def __init__(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.function, self.args, self.kwargs = function, args, kwargs
        self.result: Any = None
        self.error: BaseException | None = None
        self.running = False
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        with self.lock:
            self.running = True
        try:
            self.result = self.function(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            self.error = exc
        finally:
            with self.lock:
                self.running = False
            self.done.set()

    def interrupt(self, thread_id: int, exception: type[BaseException]) -> None:
        """Raise ``exception`` in the compute thread if it is still inside this job."""
        with self.lock:
            if self.running:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread_id), ctypes.py_object(exception)
                )


class _Worker:
    """A daemon thread that reports its arena, then runs jobs (or, if rejected, just ends)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.arena_checked = threading.Event()
        self.main_arena = False
        self.thread = threading.Thread(target=self._serve, name="codeformer-compute", daemon=True)
        self.thread.start()
        self.arena_checked.wait()

    def _serve(self) -> None:
        self.main_arena = on_main_arena()
        self.arena_checked.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job.run()
            except BaseException:  # noqa: BLE001 - a cancel that landed as its job was finishing
                if job.error is None and not job.done.is_set():
                    job.error = RuntimeError("the computation was interrupted as it finished")
                job.done.set()


class ComputeThread:
    """Runs calls on a thread of glibc's main arena; runs them inline where none can be had."""

    def __init__(self, attempts: int = 64, require_main_arena: bool = True) -> None:
        self._worker: _Worker | None = None
        if not require_main_arena:  # tests of the hand-over itself
            self._worker = _Worker()
            return
        if platform.libc_ver()[0] != "glibc":
            return
        # A new thread takes a free arena of an ended thread first, then a new arena while
        # glibc's limit allows (M_ARENA_MAX=1 from runtime.retain_freed_memory, unless the
        # process already fixed a limit: 8 x cores once it had more than 8 arenas), then the
        # existing arenas in turn. Rejected threads stay alive, holding their arenas, until
        # one lands on the main arena.
        rejected: list[_Worker] = []
        for _ in range(attempts):
            worker = _Worker()
            if worker.main_arena:
                self._worker = worker
                break
            rejected.append(worker)
        for worker in rejected:
            worker.jobs.put(None)
        if self._worker is None:
            log.warning(
                "no thread on glibc's main malloc arena after %d tries: the pipeline runs on the "
                "caller's thread (start the server with MALLOC_ARENA_MAX=1 for fast CPU forwards)",
                attempts,
            )

    @property
    def on_main_arena(self) -> bool:
        return self._worker is not None and self._worker.main_arena

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` on the compute thread; its result, or its exception raised here."""
        worker = self._worker
        if worker is None or threading.current_thread() is worker.thread:
            return function(*args, **kwargs)
        job = _Job(function, args, kwargs)
        worker.jobs.put(job)
        try:
            while not job.done.wait(WAIT_SLICE_S):
                pass
        except BaseException as exc:
            # a cancel raised in this (waiting) thread: stop the computation too, then leave
            assert worker.thread.ident is not None
            job.interrupt(worker.thread.ident, type(exc))
            job.done.wait()
            raise
        if job.error is not None:
            raise job.error
        return job.result
