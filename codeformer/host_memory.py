"""CPU forwards on glibc: the device thread runs on the main malloc arena, which keeps freed memory.

What: on a CPU device under glibc, the thread of a ``Restorer``'s ``DeviceScheduler`` (the one
thread that runs every device call, the forwards and their tensors, whoever asks:
``codeformer.scheduler``) is started as a thread glibc put on its main arena
(``start_device_thread``), and glibc is told to serve every block from that arena's heap and
to keep up to ``Settings.retained_memory_mb`` of freed memory there (``mallopt``:
``M_ARENA_MAX=1``, ``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD``). Elsewhere (a GPU, whose
activations live in CUDA memory; musl; a setting of 0) the device thread is a plain thread
and these settings are not made.

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
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DEVICE_THREAD_NAME = "codeformer-device"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def pays_on(device: torch.device, retained_memory_mb: int) -> bool:
    """Whether a ``Restorer`` on ``device`` runs its device thread on the main arena, malloc set for it."""
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


def start_thread(run: Callable[[], None]) -> threading.Thread:
    """``run`` on a new daemon device thread, wherever glibc puts it."""
    thread = threading.Thread(target=run, name=DEVICE_THREAD_NAME, daemon=True)
    thread.start()
    return thread


class _Candidate:
    """A thread that runs ``run`` if glibc put it on the main arena, else waits for ``release`` and ends."""

    def __init__(self, run: Callable[[], None], release: threading.Event) -> None:
        self.main_arena = False
        self._run, self._release = run, release
        self._checked = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=DEVICE_THREAD_NAME, daemon=True)
        self.thread.start()
        self._checked.wait()

    def _serve(self) -> None:
        self.main_arena = on_main_arena()  # glibc picks the arena at a thread's first malloc
        self._checked.set()
        if self.main_arena:
            self._run()
        else:
            self._release.wait()


def _keep_freed_memory(retained_memory_mb: int) -> bool:
    libc = ctypes.CDLL(None)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, retained_memory_mb << 20))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def start_device_thread(
    run: Callable[[], None], device: torch.device, retained_memory_mb: int
) -> threading.Thread:
    """``run`` on a new daemon thread: on glibc's main arena, which keeps freed memory, where that pays.

    Where it does not (``pays_on``), or glibc refuses, or no thread lands there: a plain thread.
    """
    if not pays_on(device, retained_memory_mb):
        return start_thread(run)
    if not _keep_freed_memory(retained_memory_mb):
        log.warning("host memory: glibc refused mallopt; CPU forwards page-fault their activations anew")
        return start_thread(run)
    # worst case: every free arena, then new ones up to glibc's limit (8 per core), then each once
    tries = 16 * len(os.sched_getaffinity(0)) + 1
    release = threading.Event()  # the candidates that missed wait, so that each try meets another arena
    missed: list[_Candidate] = []
    found: _Candidate | None = None
    while found is None and len(missed) < tries:
        candidate = _Candidate(run, release)
        if candidate.main_arena:
            found = candidate
        else:
            missed.append(candidate)
    release.set()
    for candidate in missed:
        candidate.thread.join()
    if found is None:
        log.warning(
            "host memory: no thread on glibc's main malloc arena after %d tries: CPU forwards may "
            "page-fault their activations anew",
            tries,
        )
        return start_thread(run)
    log.info(
        "host memory: the device thread runs on glibc's main arena (found on try %d), up to %d MB of freed "
        "memory kept for reuse",
        len(missed) + 1,
        retained_memory_mb,
    )
    return found.thread
