"""``codeformer.host_memory``: where it engages, the page faults it saves, the hand-over of calls.

The subprocess test rebuilds a coglet worker in a fresh interpreter: a long-lived request
thread that allocated before the ``Restorer`` was built (so it has a malloc arena of its
own), then a ``Restorer`` on a CPU or another device. It counts how many of 20 cycles that
allocate and free a 64 MB tensor page-fault the block in again (more than half of its pages):
on the request thread's own arena, after a hand-over to the device scheduler (which runs it on
the compute thread when there is one), and on the main
thread, which shows whether malloc's settings changed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import flat_canvas, png_bytes
from PIL import Image

from codeformer.host_memory import ComputeThread, pays_on

_COGLET_LIKE = """
import concurrent.futures, resource, sys
import torch
from torch import nn
from codeformer.config import Settings
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets

def faulting_cycles(_restorer=None):
    faulting = 0
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()  # 64 MB
        faulting += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before > (64 << 20) // 4096 // 2
    return faulting

request_thread = concurrent.futures.ThreadPoolExecutor(1)
request_thread.submit(lambda: torch.ones(1 << 20).sum()).result()  # its arena exists now
device, retained_memory_mb = torch.device(sys.argv[1]), int(sys.argv[2])
nets = Nets(*(nn.Identity().to(device) for _ in range(3)))
restorer = Restorer(nets, device, Settings(retained_memory_mb=retained_memory_mb))
handed_over = request_thread.submit(restorer.scheduler.call, faulting_cycles).result()
print(restorer.compute_thread is not None, handed_over, faulting_cycles())
"""


def _coglet_like(device: str, retained_memory_mb: int) -> tuple[bool, int, int]:
    """(compute thread started, faulting cycles of a request thread's call, of the main thread)."""
    completed = subprocess.run(
        [sys.executable, "-c", _COGLET_LIKE, device, str(retained_memory_mb)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    started, handed_over, main_thread = completed.stdout.split()
    return started == "True", int(handed_over), int(main_thread)


# glibc's default: every cycle maps the 64 MB block afresh. With the compute thread and
# retained memory, the main heap settles within a few cycles (measured: 2-3 of 20 fault, up to
# 7 when the kernel's page reclaimer takes idle heap pages back meanwhile).
@pytest.mark.slow  # a fresh interpreter that imports the pipeline: ~10 s
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_a_cpu_restorer_keeps_freed_memory_for_calls_from_a_thread_with_its_own_arena() -> None:
    started, handed_over, main_thread = _coglet_like("cpu", 2047)
    assert started
    assert handed_over <= 10
    assert main_thread <= 10  # the setting is process-wide in a CPU process


@pytest.mark.parametrize(
    ("device", "retained_memory_mb"),
    [("meta", 2047), ("cpu", 0)],  # meta: no GPU here, but it takes the same (non-CPU) path as cuda
    ids=["non-cpu-device", "retention-off"],
)
@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_elsewhere_a_restorer_leaves_malloc_alone(device: str, retained_memory_mb: int) -> None:
    assert _coglet_like(device, retained_memory_mb) == (False, 20, 20)


def test_only_a_cpu_with_glibc_and_retained_memory_engages_it() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert pays_on(torch.device("cpu"), 2047) is glibc
    assert not pays_on(torch.device("cpu"), 0)
    assert not pays_on(torch.device("cuda", 0), 2047)
    assert not pays_on(torch.device("mps"), 2047)


def test_results_and_exceptions_come_back_to_the_caller() -> None:
    compute = ComputeThread()
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
    assert compute.call(compute.call, work, 4) == 4  # a call from the compute thread runs inline
    compute.stop()


class _Cancel(BaseException):
    """Stands for coglet's CancelationException, which it raises in predict()'s thread."""


def test_a_cancel_raised_in_the_waiting_thread_stops_the_computation() -> None:
    compute = ComputeThread()
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
    compute.stop()


@pytest.mark.slow  # loads the three nets in a fresh interpreter
def test_a_process_that_ran_the_pipeline_on_the_compute_thread_exits_cleanly(
    weights_dir: Path, tmp_path: Path
) -> None:
    # the compute thread must have ended before the C++ runtime tears down: the CLI aborted at
    # exit ("terminate called without an active exception", status 134) after writing its output
    photo = tmp_path / "flat.png"
    photo.write_bytes(png_bytes(flat_canvas(width=48, height=64)))
    completed = subprocess.run(
        [sys.executable, "-m", "codeformer", str(photo), "--output-dir", str(tmp_path / "out")],
        env={**os.environ, "CODEFORMER_WEIGHTS_DIR": str(weights_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "terminate called" not in completed.stderr
    assert "host memory: the pipeline runs on glibc's main arena" in completed.stderr
    with Image.open(tmp_path / "out" / "flat.jpg") as restored:
        assert restored.size == (48, 64)
