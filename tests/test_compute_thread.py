"""``codeformer.compute_thread``: a thread on glibc's main arena, and the hand-over of calls and cancels.

coglet calls ``predict()`` on threads of its own, made before ``setup()``; such a thread's
malloc arena maps big blocks afresh on every forward. The subprocess test rebuilds that
situation in a fresh interpreter: a long-lived thread that allocated before the allocator
setting, whose own 64 MB blocks fault in every time, and whose calls handed to the compute
thread do not.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from faulting_cycles import FAULTING_CYCLES

from codeformer.compute_thread import ComputeThread

_COGLET_LIKE = f"""{FAULTING_CYCLES}
import concurrent.futures
from codeformer.compute_thread import ComputeThread
from codeformer.runtime import retain_freed_memory

request_thread = concurrent.futures.ThreadPoolExecutor(1)
request_thread.submit(lambda: torch.ones(1 << 20).sum()).result()  # its arena exists now
retain_freed_memory(2047)
compute = ComputeThread()
on_own_arena = request_thread.submit(faulting_cycles).result()
handed_over = request_thread.submit(compute.call, faulting_cycles).result()
print(compute.on_main_arena, on_own_arena, handed_over)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_calls_handed_to_the_compute_thread_reuse_memory_where_the_callers_thread_cannot() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _COGLET_LIKE],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    main_arena, on_own_arena, handed_over = completed.stdout.split()
    assert main_arena == "True"
    assert int(on_own_arena) == 20  # the request thread's arena maps every 64 MB block afresh
    assert int(handed_over) <= 10  # the main heap settles within a few cycles (see test_config_runtime)


def test_results_and_exceptions_come_back_to_the_caller() -> None:
    compute = ComputeThread(require_main_arena=False)
    threads: list[threading.Thread] = []

    def work(a: int, b: int = 0) -> int:
        threads.append(threading.current_thread())
        return a + b

    assert compute.call(work, 2, b=3) == 5
    assert threads[0] is not threading.current_thread()

    def fail() -> None:
        raise ValueError("images[0] (x.jpg): broken")

    with pytest.raises(ValueError, match=r"images\[0\] \(x.jpg\): broken"):
        compute.call(fail)
    assert compute.call(work, 1) == 1  # the thread survives its call's exception
    assert threads[-1] is threads[0]


class _Cancel(BaseException):
    """Stands for coglet's CancelationException, which it raises in predict()'s thread."""


def test_a_cancel_raised_in_the_waiting_thread_stops_the_computation() -> None:
    compute = ComputeThread(require_main_arena=False)
    steps: list[int] = []
    outcome: dict[str, object] = {}

    def slow() -> str:
        for step in range(500):
            steps.append(step)
            time.sleep(0.01)
        return "finished"

    def request() -> None:
        try:
            outcome["result"] = compute.call(slow)
        except _Cancel:
            outcome["cancelled_after_steps"] = len(steps)

    waiting = threading.Thread(target=request)
    waiting.start()
    while len(steps) < 5:
        time.sleep(0.01)
    assert waiting.ident is not None
    # what coglet does on POST /predictions/{id}/cancel
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(waiting.ident), ctypes.py_object(_Cancel))
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert "result" not in outcome
    stopped_at = len(steps)
    assert outcome["cancelled_after_steps"] == stopped_at < 500  # it waited for the stop
    time.sleep(0.1)
    assert len(steps) == stopped_at  # and nothing runs on
    assert compute.call(lambda: "next") == "next"  # the compute thread serves the next request
