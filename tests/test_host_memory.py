"""``codeformer.host_memory``: where it engages, the page faults it saves, the device thread.

The subprocess test rebuilds a coglet worker in a fresh interpreter: a long-lived request
thread that allocated before the ``Restorer`` was built (so it has a malloc arena of its
own), then a ``Restorer`` on a CPU or another device. It counts how many of 20 cycles that
allocate and free a 64 MB tensor page-fault the block in again (more than half of its pages):
handed over from the request thread to the device scheduler (whose thread is on the main
arena on a CPU), and on the main thread, which shows whether malloc's settings changed.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import flat_canvas, png_bytes
from PIL import Image
from torch import nn

from codeformer.config import Settings
from codeformer.host_memory import DEVICE_THREAD_NAME, in_heap, on_main_arena, pays_on
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets

_COGLET_LIKE = """
import concurrent.futures, resource, sys
import torch
from torch import nn
from codeformer.config import Settings
from codeformer.host_memory import on_main_arena
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
print(restorer.scheduler.call(on_main_arena), handed_over, faulting_cycles())
"""


def _coglet_like(device: str, retained_memory_mb: int) -> tuple[bool, int, int]:
    """(device thread on the main arena, faulting cycles of a request thread's call, of the main thread)."""
    completed = subprocess.run(
        [sys.executable, "-c", _COGLET_LIKE, device, str(retained_memory_mb)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    main_arena, handed_over, main_thread = completed.stdout.split()
    return main_arena == "True", int(handed_over), int(main_thread)


# glibc's default: every cycle maps the 64 MB block afresh. With the device thread on the main
# arena and retained memory, the main heap settles within a few cycles (a few more fault when the
# kernel's page reclaimer takes idle heap pages back meanwhile).
@pytest.mark.process  # a fresh interpreter that imports the pipeline
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_a_cpu_restorer_keeps_freed_memory_for_calls_from_a_thread_with_its_own_arena() -> None:
    main_arena, handed_over, main_thread = _coglet_like("cpu", 2047)
    assert main_arena
    assert handed_over <= 10
    assert main_thread <= 10  # the setting is process-wide in a CPU process


@pytest.mark.parametrize(
    ("device", "retained_memory_mb"),
    [("meta", 2047), ("cpu", 0)],  # meta: no GPU here, but it takes the same (non-CPU) path as cuda
    ids=["non-cpu-device", "retention-off"],
)
@pytest.mark.process
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_elsewhere_blocks_of_activation_size_are_returned_to_the_system(
    device: str, retained_memory_mb: int
) -> None:
    """Off the CPU only blocks up to 32 MB are kept (for requests' host work); with retention off, none."""
    _, handed_over, main_thread = _coglet_like(device, retained_memory_mb)
    assert (handed_over, main_thread) == (20, 20)


_GPU_WORKER_LIKE = """
import concurrent.futures, resource, sys
import torch
from torch import nn
from codeformer.config import PROJECT_ROOT, Settings
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets
from benchmarks.host_pass import host_pass, one_face, square_photo

device, retained_memory_mb = torch.device(sys.argv[1]), int(sys.argv[2])
nets = Nets(*(nn.Identity().to(device) for _ in range(3)))
restorer = Restorer(nets, device, Settings(retained_memory_mb=retained_memory_mb, mixed_precision="off"))
photo, face = square_photo(PROJECT_ROOT / "data" / "3.jpg", 1000), one_face(1000, 384.0, 0.12)

def faults_per_request():
    for _ in range(3):
        host_pass(photo, face, None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        host_pass(photo, face, None)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

# a request thread, made after set-up as the server's are
print(concurrent.futures.ThreadPoolExecutor(1).submit(faults_per_request).result())
"""


@pytest.mark.process  # fresh interpreters that import the pipeline and run 13 host passes each
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_off_the_cpu_the_host_work_of_a_request_reuses_the_memory_of_the_last_one() -> None:
    """A one-face 1 MP request's host stages (benchmarks/host_pass.py) on a request thread."""

    def faults_per_request(retained_memory_mb: int) -> float:
        completed = subprocess.run(
            [sys.executable, "-c", _GPU_WORKER_LIKE, "meta", str(retained_memory_mb)],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return float(completed.stdout.split()[-1])

    # glibc's defaults give much of a request's buffers back, and the next request faults them in
    assert faults_per_request(0) > 1000
    assert faults_per_request(2047) < 100


def test_only_a_cpu_with_glibc_and_retained_memory_engages_it() -> None:
    glibc = platform.libc_ver()[0] == "glibc"
    assert pays_on(torch.device("cpu"), 2047) is glibc
    assert not pays_on(torch.device("cpu"), 0)
    assert not pays_on(torch.device("cuda", 0), 2047)
    assert not pays_on(torch.device("mps"), 2047)


def test_an_address_in_any_part_of_a_split_heap_is_in_the_heap() -> None:
    # /proc/self/maps of a test process whose heap NumPy's huge-page advice had split in three
    maps = [
        "561f793ef000-561f82a31000 rw-p 00000000 00:00 0                          [heap]\n",
        "561f82a31000-561f82fb1000 rw-p 00000000 00:00 0                          [heap]\n",
        "561f82fb1000-561fa4604000 rw-p 00000000 00:00 0                          [heap]\n",
        "7f8ecc000000-7f8ecc021000 rw-p 00000000 00:00 0 \n",
    ]
    assert in_heap(0x561F793EF000, maps) and in_heap(0x561F9A000000, maps)
    assert not in_heap(0x7F8ECC000100, maps) and not in_heap(0x561FA4604000, maps)


def _device_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == DEVICE_THREAD_NAME]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_a_cpu_restorer_runs_every_device_call_on_one_thread_on_the_main_arena() -> None:
    before = _device_threads()
    nets = Nets(*(nn.Identity() for _ in range(3)))
    restorer = Restorer(nets, torch.device("cpu"), Settings(retained_memory_mb=2047, mixed_precision="off"))
    threads = {restorer.scheduler.call(threading.current_thread) for _ in range(3)}
    assert len(threads) == 1 and threads != {threading.current_thread()}
    assert restorer.scheduler.call(on_main_arena)
    (device_thread,) = set(_device_threads()) - set(before)  # the candidates that missed have ended
    assert threads == {device_thread}

    def fail() -> None:
        raise ValueError("images[0] (x.jpg): broken")

    with pytest.raises(ValueError, match=r"images\[0\] \(x.jpg\): broken"):
        restorer.scheduler.call(fail)
    assert restorer.scheduler.call(threading.current_thread) is device_thread  # it survives its call's error
    del restorer
    gc.collect()
    assert not device_thread.is_alive()  # the device thread ends with its Restorer


@pytest.mark.process  # loads the three nets in a fresh interpreter
def test_a_process_that_ran_the_pipeline_on_the_device_thread_exits_cleanly(
    weights_dir: Path, tmp_path: Path
) -> None:
    # the device thread must have ended before the C++ runtime tears down: the CLI aborted at
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
    assert "host memory: the device thread runs on glibc's main arena" in completed.stderr
    with Image.open(tmp_path / "out" / "flat.jpg") as restored:
        assert restored.size == (48, 64)
