"""CPU forwards on glibc: device calls run on a thread of the main malloc arena, which keeps freed memory.

What: on a CPU device under glibc, a ``Restorer`` starts one ``ComputeThread`` that glibc put on
its main arena, tells glibc to serve every block from that arena's heap and to keep up to
``Settings.retained_memory_mb`` of freed memory there (``mallopt``: ``M_ARENA_MAX=1``,
``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD``), and its ``DeviceScheduler`` runs every device call
(the forwards and their tensors) on that thread, whoever asks (``codeformer.scheduler``).
Elsewhere (a GPU, whose activations live in CUDA memory; musl; a setting of 0) nothing
starts, malloc keeps its defaults, and the scheduler runs device calls on its own thread.

Why: a CodeFormer forward at 512x512 allocates and frees gigabytes of activations, many of
them 32-64 MB or more. By default glibc maps each block over 32 MB afresh and unmaps it on
``free``, so every forward page-faults (and the kernel zeroes) all of it again: 1.8 M minor
faults per forward. Kept in the heap, the fp32 forward took 3.2 s instead of 4.7 s on the
2-core CPU machines, computing the same numbers. Only the main arena can keep them: any other
arena grows in 64 MB heaps, and a block that does not fit one is mapped with ``mmap`` whatever
``M_MMAP_MAX`` says (sysmalloc's fallback). Cog calls ``predict()`` on threads it made before
``setup()``, each with an arena of its own: there every forward faulted again (golden photo 01
at baseline through the server: 4.5 M faults, 14-21 s per request against 10.6 s). One arena
also keeps the worker from growing: freed pages pile up per arena (a 300-request soak grew it
by 190 MB with glibc's default arenas, by 0.2 MB with one).

How the thread is found: a new thread takes a free arena of an ended thread first, then a new
arena while glibc's limit allows, then the existing arenas in turn. ``M_ARENA_MAX=1`` sets that
limit only if the process never needed more than 8 arenas (glibc then fixes it at 8 per core),
and threads that already have an arena keep it; ``MALLOC_ARENA_MAX`` in the environment acts
only at process start, which a Cog deployment does not control. So threads are started until
one reports the main arena; the others are held meanwhile, so that each try meets another arena
(in the Cog worker, without ``MALLOC_ARENA_MAX``, the first try lands there).

Measured with this module (golden photo 01 at baseline through the server, seed-0 random
weights, one run on a 2-core machine at load 10): 33-240 minor faults per warm request, against
5.8 M and 1.3x the wall time with ``retained_memory_mb=0``; 2-3 when the server also set
``MALLOC_ARENA_MAX=1`` (Cog's own threads, which decode and encode, then share the main arena
too). A 100-request soak (``benchmarks/soak.py``) grew the worker by 1.6 MB after warm-up, its
main heap flat at 2.2 GB (0.06 MB with ``MALLOC_ARENA_MAX=1``).

The cost: the process stays at its peak heap (about +600 MB after the first face), at most
``retained_memory_mb`` above what is in use.

An exception raised asynchronously in the waiting caller (as coglet does to a sync
``predict()``'s thread on cancel) is passed on to the compute thread, which stops at its next
Python bytecode, as the call would have had it run on the caller's thread. The server's
cancels take the scheduler's route instead (a flag read before each device call).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.05  # the waiting thread wakes this often, so that an injected cancel is raised
# how long stopping (at exit, or when the Restorer goes) waits for a computation still running
STOP_WAIT_S = 10.0

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def pays_on(device: torch.device, retained_memory_mb: int) -> bool:
    """Whether a ``Restorer`` on ``device`` starts the compute thread and changes malloc's settings."""
    return device.type == "cpu" and retained_memory_mb > 0 and platform.libc_ver()[0] == "glibc"


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


class ComputeThread:
    """A daemon thread that runs calls for other threads, one at a time, and notes its malloc arena."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.main_arena = False
        arena_checked = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(arena_checked,), name="codeformer-compute", daemon=True
        )
        self._thread.start()
        arena_checked.wait()

    def _serve(self, arena_checked: threading.Event) -> None:
        self.main_arena = on_main_arena()  # glibc picks the arena at a thread's first malloc
        arena_checked.set()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.run()
            except BaseException:  # noqa: BLE001 - a cancel that landed as its job was finishing
                if job.error is None and not job.done.is_set():
                    job.error = RuntimeError("the computation was interrupted as it finished")
                job.done.set()

    def stop(self) -> None:
        """End the thread after the calls already handed over, and wait for it to end.

        Waiting matters at interpreter exit: a thread that ran torch or OpenCV work and is still
        alive while the C++ runtime tears down aborts the process ("terminate called without an
        active exception", exit status 134).
        """
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_WAIT_S)

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` on the compute thread; its result, or its exception raised here."""
        # inline on the thread itself and once it has ended (a forked child has none)
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return function(*args, **kwargs)
        job = _Job(function, args, kwargs)
        self._jobs.put(job)
        try:
            while not job.done.wait(WAIT_SLICE_S):
                pass
        except BaseException as exc:
            # a cancel raised in this (waiting) thread: stop the computation too, then leave
            assert self._thread.ident is not None
            job.interrupt(self._thread.ident, type(exc))
            job.done.wait()
            raise
        if job.error is not None:
            raise job.error
        return job.result


def _keep_freed_memory(retained_memory_mb: int) -> bool:
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, retained_memory_mb << 20))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def start_compute_thread(
    owner: object, device: torch.device, retained_memory_mb: int
) -> ComputeThread | None:
    """``owner``'s compute thread on ``device``, malloc set up for it; None where it does not pay.

    The thread ends when ``owner`` (a ``Restorer``) is garbage-collected.
    """
    if not pays_on(device, retained_memory_mb):
        return None
    if not _keep_freed_memory(retained_memory_mb):
        log.warning("host memory: glibc refused mallopt; CPU forwards page-fault their activations anew")
        return None
    # worst case: every free arena, then new ones up to glibc's limit (8 per core), then each once
    tries = 16 * len(os.sched_getaffinity(0)) + 1
    held: list[ComputeThread] = []
    found: ComputeThread | None = None
    while found is None and len(held) < tries:
        thread = ComputeThread()
        if thread.main_arena:
            found = thread
        else:
            held.append(thread)
    for thread in held:
        thread.stop()
    if found is None:
        log.warning(
            "host memory: no thread on glibc's main malloc arena after %d tries: CPU forwards run on "
            "the caller's thread and may page-fault their activations anew",
            tries,
        )
    else:
        weakref.finalize(owner, found.stop)
        log.info(
            "host memory: the pipeline runs on glibc's main arena (found on try %d), up to %d MB of freed "
            "memory kept for reuse",
            len(held) + 1,
            retained_memory_mb,
        )
    return found
