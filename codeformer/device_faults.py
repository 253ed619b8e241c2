"""What can go wrong on the device, and what the process does about each.

- Out of memory (``torch.OutOfMemoryError``): the scheduler frees the failed forward's
  tensors (the exception's traceback holds its frames) before it retries a shared batch one
  request at a time (``codeformer.scheduler``); an OOM that remains fails its own request,
  naming its images (``codeformer.pipeline``).
- A broken device: after a sticky CUDA error (an illegal memory access, a device-side
  assert, ...) the CUDA context is unusable and every later call would fail with the same
  error. Only a new process gets a new context: ``stop_worker`` logs the cause and ends the
  process with a failure status. Cog's server then reports the worker as crashed (its health
  turns ``DEFUNCT``, the predictions in flight fail), the platform's signal to restart it.
- No usable CUDA where a GPU is required (``Settings.require_gpu``, which cog.yaml sets for
  the GPU image): ``require_cuda`` fails set-up and says why, instead of serving on the CPU.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

import torch

from codeformer.errors import ConfigError

log = logging.getLogger(__name__)

# cudaGetErrorString's texts of the errors that leave a CUDA context unusable ("sticky"
# errors: cudaErrorIllegalAddress, Assert, LaunchFailure, IllegalInstruction,
# MisalignedAddress, InvalidAddressSpace, InvalidPc, HardwareStackError, ECCUncorrectable,
# LaunchTimeout); torch raises them as torch.AcceleratorError (a RuntimeError), Triton as
# RuntimeError("Triton Error [CUDA]: ...").
STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "misaligned address",
    "operation not supported on global/shared address space",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ECC error encountered",
    "the launch timed out and was terminated",
)
BROKEN_DEVICE_EXIT_STATUS = 70  # sysexits.h EX_SOFTWARE: the process failed, not a request
# between the critical log line and the exit: requests in flight answer with
# DeviceBrokenError, and the log lines reach Cog's server, meanwhile
EXIT_GRACE_S = 2.0

# torch 2.14.1's default wheel (PyPI) is built with CUDA 13.0. CUDA 13.x runs on NVIDIA
# drivers of branch R580 or newer (CUDA minor-version compatibility; 13.0 GA shipped with
# 580.65.06), and has kernels for GPUs of compute capability 7.5 or newer only (CUDA 13
# builds none for Maxwell, Pascal or Volta).
MIN_NVIDIA_DRIVER = 580
NVIDIA_DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
REQUIRE_GPU_SETTING = "CODEFORMER_REQUIRE_GPU=1 (cog.yaml sets it for the GPU image)"


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def is_broken_device(error: BaseException) -> bool:
    """Whether ``error`` is a sticky CUDA error, after which no device call can succeed."""
    if not isinstance(error, RuntimeError) or is_out_of_memory(error):
        return False
    text = str(error)
    return "CUDA" in text and any(phrase in text for phrase in STICKY_CUDA_ERRORS)


def stop_worker(cause: BaseException, grace_s: float = EXIT_GRACE_S) -> None:
    """Log ``cause`` as critical and end the process, so that Cog starts a new worker.

    ``os._exit``: the device thread cannot unwind the other threads, and the atexit handlers
    would make device calls on the broken context.
    """
    log.critical(
        "the device is broken and no later call can succeed: %s: %s. Stopping the worker (exit status "
        "%d) so that a new one starts",
        type(cause).__name__,
        cause,
        BROKEN_DEVICE_EXIT_STATUS,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    time.sleep(grace_s)
    os._exit(BROKEN_DEVICE_EXIT_STATUS)


def nvidia_driver_version(version_file: Path = NVIDIA_DRIVER_VERSION_FILE) -> str | None:
    """The loaded NVIDIA kernel driver's version ("580.65.06"), or None when none is loaded."""
    try:
        text = version_file.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def _driver_note(driver: str | None) -> str:
    if driver is None:
        return "no NVIDIA kernel driver is loaded in this container (/proc/driver/nvidia/version is missing)"
    if int(driver.split(".")[0]) < MIN_NVIDIA_DRIVER:
        return f"the host's NVIDIA driver {driver} is too old"
    return f"NVIDIA driver {driver} found"


def require_cuda(device: torch.device, driver: str | None = None) -> None:
    """Raise ``ConfigError`` saying why unless ``device`` is a CUDA device that runs a kernel.

    ``driver``: the NVIDIA driver version; read from the kernel when None.
    """
    if device.type != "cuda" and torch.cuda.is_available():
        raise ConfigError(
            f"{REQUIRE_GPU_SETTING}, but the pipeline was asked to run on {device}; leave the device "
            "unset (CUDA is available) or set CODEFORMER_REQUIRE_GPU=0"
        )
    if not torch.cuda.is_available():
        driver = driver or nvidia_driver_version()
        build = (
            f"torch {torch.__version__} is built with CUDA {torch.version.cuda}, which needs an NVIDIA "
            f"driver >= {MIN_NVIDIA_DRIVER} and a GPU of compute capability 7.5 or newer"
            if torch.version.cuda
            else f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        )
        raise ConfigError(
            f"{REQUIRE_GPU_SETTING}, but torch finds no usable CUDA device (torch.cuda.is_available() "
            f"is False): {build}; {_driver_note(driver)}. Run the container with the GPU (docker run "
            "--gpus all) on a host where nvidia-smi works, or set CODEFORMER_REQUIRE_GPU=0 to serve on "
            "the CPU"
        )
    try:
        torch.ones(1, device=device).add_(1).item()  # one kernel: the build has code for this GPU
    except RuntimeError as exc:
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"{REQUIRE_GPU_SETTING}, but CUDA cannot run a kernel on {torch.cuda.get_device_name(device)} "
            f"(compute capability {major}.{minor}; this torch build has kernels for "
            f"{', '.join(torch.cuda.get_arch_list())}): {exc}"
        ) from None


def out_of_memory_reason(step: str, error: BaseException) -> str:
    """What a request's error says when the device ran out of memory during ``step``."""
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"the device ran out of memory {step} ({first_line}); send fewer or smaller images (other "
        "requests in flight share the device's memory), or lower CODEFORMER_FACE_BATCH"
    )
