"""glibc's malloc set up for a ``Restorer``: freed memory kept for reuse, not page-faulted in again.

``device_thread_starter`` makes the settings for a ``Restorer`` on a device and says how its
``DeviceScheduler`` starts the device thread (``codeformer.scheduler``). Nothing changes under
another C library (musl) or with ``Settings.retained_memory_mb`` 0.

- CPU: the device thread runs on glibc's main arena (``start_on_main_arena``: threads are
  started until one reports it), every block is served from that arena's heap, and up to
  ``retained_memory_mb`` of freed memory stays there (``mallopt``: ``M_ARENA_MAX=1``,
  ``M_MMAP_MAX=0``, ``M_TRIM_THRESHOLD``), so a forward's activations are not faulted in again.
- Off the CPU: a plain device thread; the requests' host buffers are kept in each arena's heap
  instead (``keep_host_work_memory``: mmap threshold fixed at 32 MB, up to 64 MB kept per arena).

Why, what it costs, and how the main arena is found: docs/host-memory.md.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

DEVICE_THREAD_NAME = "codeformer-device"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Off the CPU: blocks up to this come from the arenas' heaps (glibc refuses more: HEAP_MAX_SIZE / 2)
HOST_WORK_MMAP_THRESHOLD_MB = 32
HOST_WORK_KEPT_PER_ARENA_MB = 64  # freed memory each arena keeps for the next request's host work

ThreadStarter = Callable[[Callable[[], None]], threading.Thread]


def _glibc_with_retention(retained_memory_mb: int) -> bool:
    return retained_memory_mb > 0 and platform.libc_ver()[0] == "glibc"


def pays_on(device: torch.device, retained_memory_mb: int) -> bool:
    """Whether a ``Restorer`` on ``device`` runs its device thread on the main arena, malloc set for it."""
    return device.type == "cpu" and _glibc_with_retention(retained_memory_mb)


def on_main_arena() -> bool:
    """Whether the calling thread's malloc serves from glibc's main arena (the brk ``[heap]``)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    pointer = libc.malloc(4096)
    try:
        with open("/proc/self/maps") as maps:
            return in_heap(pointer, maps)
    finally:
        libc.free(pointer)


def in_heap(address: int, maps: Iterable[str]) -> bool:
    """Whether ``address`` lies in the brk ``[heap]``, given the lines of ``/proc/<pid>/maps``.

    The heap can show as several mappings: the kernel splits it where flags differ, e.g. where
    NumPy asked for huge pages (madvise) on a large array's part of it.
    """
    for line in maps:
        if line.rstrip().endswith("[heap]"):
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False


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


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def keep_host_work_memory(retained_memory_mb: int) -> bool:
    """Off the CPU: mmap threshold fixed at 32 MB, up to 64 MB freed kept per arena; whether glibc agreed."""
    kept_mb = min(retained_memory_mb, HOST_WORK_KEPT_PER_ARENA_MB)
    threshold = HOST_WORK_MMAP_THRESHOLD_MB << 20
    return _mallopt((_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, kept_mb << 20))


def device_thread_starter(device: torch.device, retained_memory_mb: int) -> ThreadStarter:
    """Set glibc's malloc up for a ``Restorer`` on ``device``; how its device thread is started."""
    if not _glibc_with_retention(retained_memory_mb):
        return start_thread
    if device.type == "cpu":
        return functools.partial(start_on_main_arena, retained_memory_mb=retained_memory_mb)
    if keep_host_work_memory(retained_memory_mb):
        log.info(
            "host memory: requests' host work takes blocks up to %d MB from malloc's heaps, each keeping up "
            "to %d MB freed for reuse",
            HOST_WORK_MMAP_THRESHOLD_MB,
            min(retained_memory_mb, HOST_WORK_KEPT_PER_ARENA_MB),
        )
    else:
        log.warning("host memory: glibc refused mallopt; requests' host work page-faults its buffers anew")
    return start_thread


def start_on_main_arena(run: Callable[[], None], retained_memory_mb: int) -> threading.Thread:
    """``run`` on a new daemon thread on glibc's main arena, which keeps freed memory (a CPU device).

    A plain thread if glibc refuses the settings or no thread lands there.
    """
    if not _mallopt((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, retained_memory_mb << 20)):
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
