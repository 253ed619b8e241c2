"""The one place that touches devices, memory formats, ``torch.backends`` and ``torch.compile``.

A ``Runtime`` owns the three loaded nets and hands the pipeline the variant a request
asks for: the nets as loaded (``safe``), or channels_last copies compiled with one backend
(``optimized``). Optimized requests in mixed precision get their own copies whose
convolution weights are stored in the autocast dtype, so that no forward re-casts them.
Each optimized variant is built once per process, at set-up when ``CODEFORMER_COMPILE_BACKEND``
names the backend (``Restorer.prepare_optimized``), else on first use, and the backend is
then fixed: switching backends would recompile every graph and multiply the memory held, so
a request that asks for another backend is refused.
"""

from __future__ import annotations

import collections
import copy
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from codeformer.config import CUDA_ONLY_BACKENDS, GRAPH_REPLAYING_BACKENDS, Stability
from codeformer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Nets:
    """The three networks in eval mode on one device."""

    codeformer: nn.Module
    retinaface: nn.Module
    parsenet: nn.Module


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# bf16 must beat float32 by this factor on the calibration convolution to be used
MIXED_PRECISION_MIN_GAIN = 1.1


def _time_convolution(
    dtype: torch.dtype, repeats: int = 5, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Best of ``repeats`` seconds for one 3x3 64->64 convolution at 256x256 in channels_last.

    The channels of CodeFormer's full-resolution layers, where most of its time goes, at a
    quarter of their area to keep the measurement short; the best of several runs keeps a
    busy moment from deciding.
    """
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 64, 256, 256, generator=generator).to(dtype, memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3, generator=generator).to(dtype, memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first call creates the primitive
            start = clock()
            torch.nn.functional.conv2d(features, weight, padding=1)
            best = min(best, clock() - start)
    return best


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has native bf16 convolutions on this CPU (AVX-512 BF16 or AMX).

    Without them (AVX2 only) bf16 is emulated, and a convolution is orders of magnitude slower
    than in float32.
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def mixed_precision_pays(
    device: torch.device,
    setting: str = "auto",
    time_convolution: Callable[[torch.dtype], float] = _time_convolution,
    has_bf16_kernels: Callable[[], bool] = cpu_has_bf16_kernels,
) -> bool:
    """Whether the fast profiles should run in reduced precision on ``device``.

    ``on``/``off`` decide. ``auto``: always on CUDA (tensor cores); on a CPU only when a bf16
    convolution measures faster than a float32 one. That depends on the chip: some CPUs with
    AVX-512 BF16 run CodeFormer faster in bf16, others (AVX-512 BF16 and FP16, no AMX) run
    bf16 convolutions slower than float32 ones. A CPU without bf16 kernels is not measured
    (its emulated bf16 probe alone would be slow).
    """
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return True
    if not has_bf16_kernels():
        log.info(
            "mixed precision on this CPU: no bf16 kernels (AVX2 only): fast and max_speed run in float32"
        )
        return False
    float32_s = time_convolution(torch.float32)
    reduced_s = time_convolution(autocast_dtype(device))
    pays = reduced_s * MIXED_PRECISION_MIN_GAIN <= float32_s
    log.info(
        "mixed precision on this CPU: a bf16 convolution takes %.1f ms, float32 %.1f ms: fast and "
        "max_speed run in %s (CODEFORMER_MIXED_PRECISION=on|off decides instead)",
        reduced_s * 1000.0,
        float32_s * 1000.0,
        "bfloat16" if pays else "float32",
    )
    return pays


def divide_exactly(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """``numerator / denominator``, correctly rounded on every device, as NumPy and the CPU divide.

    CUDA turns a division by a host number into a multiply by its reciprocal, which can
    differ in the last bit; a one-element tensor on ``numerator``'s device (filled there,
    nothing uploaded) keeps it a true division.
    """
    divisor = torch.full((1,), denominator, dtype=numerator.dtype, device=numerator.device)
    return numerator / divisor


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` copied to ``device``; on CUDA staged in pinned memory and copied without blocking.

    From pageable memory CUDA copies through a staging buffer of its own and the host waits
    for the copy; from pinned memory the copy is queued like a kernel and the host goes on
    queueing the work that reads it (stream order keeps it correct). Host tensors can be
    pinned only where CUDA is: on other devices this is ``host.to(device)``. A tensor already
    off the host (the device stages' output) is moved with ``.to``: on ``device``, not copied.
    """
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    # the caching host allocator keeps ``pinned`` until the copy has run, even once freed here
    return pinned.to(device, non_blocking=True)


def staged(parts: list[np.ndarray], device: torch.device) -> np.ndarray | torch.Tensor:
    """Host arrays joined along their first axis, ready for the device thread to upload.

    Called on a request's thread, so that the host copy is made there: on CUDA the parts are
    joined straight into pinned memory, and the device thread only queues the upload (see
    ``DeviceScheduler``), with no copy of its own on the host. Elsewhere the joined array
    (the part itself when there is one).
    """
    if device.type != "cuda":
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
    joined = torch.empty(shape, dtype=torch.from_numpy(parts[0][:0]).dtype, pin_memory=True)
    start = 0
    for part in parts:
        joined[start : start + len(part)].copy_(torch.from_numpy(np.ascontiguousarray(part)))
        start += len(part)
    return joined


class Download:
    """A device tensor on its way to the host: a copy queued into pinned memory, and an event after it.

    Made on the device thread (``downloads``), which queues the copy and goes on to the next
    request's work; waited for (``wait``, or ``arrived``) by the thread that reads it: a
    request's own. So the device thread never waits for a copy while other work is queued,
    and the device is fed while the host waits. Rows can be taken before the copy has run
    (``download[a:b]``: a view of the same buffer, under the same event), which is how the
    scheduler hands each request its share of a batch.
    """

    def __init__(self, host: torch.Tensor, event: Any | None) -> None:
        self._host = host  # filled once ``event`` has passed
        self._event = event  # None: filled already (a host tensor)

    def __getitem__(self, rows: slice) -> Download:
        return Download(self._host[rows], self._event)

    def __len__(self) -> int:
        return len(self._host)

    def wait(self) -> torch.Tensor:
        """The host tensor, once its copy has run: the calling thread sleeps until then."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


def downloads(*tensors: torch.Tensor) -> tuple[Download, ...]:
    """Each tensor copied to the host without blocking: CUDA ones into pinned memory, one event after all.

    Host tensors come as they are. On CUDA the copies are queued on the current stream and a
    blocking-sync event recorded after them: the thread that waits sleeps rather than spins,
    leaving the cores to other requests' decode and encode. Pinned buffers come from torch's
    caching host allocator, so that steady traffic reuses them.
    """
    if not any(tensor.device.type == "cuda" for tensor in tensors):
        return tuple(Download(tensor.cpu(), None) for tensor in tensors)
    device = next(tensor.device for tensor in tensors if tensor.device.type == "cuda")
    hosts = []
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)  # queued on the current stream of the tensor's device
        hosts.append(host)
    event = torch.cuda.Event(blocking=True)
    event.record(torch.cuda.current_stream(device))  # that device's stream, whichever is current
    return tuple(Download(host, event) for host in hosts)


def arrived(value: Any) -> Any:
    """``value`` with every ``Download`` in it (itself, or an item of a tuple) waited for: its tensor."""
    if isinstance(value, Download):
        return value.wait()
    if isinstance(value, tuple):
        return tuple(arrived(item) for item in value)
    return value


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Mixed-precision dtype: fp16 on CUDA (tensor cores), bf16 on CPU (AVX-512 BF16 / AMX)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@contextmanager
def cuda_numerics(device: torch.device, fast_math: bool) -> Iterator[None]:
    """For one device call: on CUDA, cuDNN autotuning and TF32 on when ``fast_math`` (fast and
    max_speed, which trade precision already), off otherwise (baseline's official numerics,
    docs/reference.md §9.17); back to off after the call. Nothing elsewhere.

    The flags are process-wide; they are safe to set per call because every torch call runs
    on the scheduler's one device thread, one at a time.
    """
    if device.type != "cuda":
        yield
        return
    _set_cuda_fast_math(fast_math)
    try:
        yield
    finally:
        _set_cuda_fast_math(False)


def _set_cuda_fast_math(enabled: bool) -> None:
    torch.backends.cudnn.benchmark = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Runtime:
    def __init__(
        self,
        nets: Nets,
        device: torch.device,
        mixed_precision: str = "auto",
        compile_backend: str = "",
    ) -> None:
        """``mixed_precision``: ``Settings.mixed_precision``, auto, on or off (``mixed_precision_pays``).

        ``compile_backend``: ``Settings.compile_backend``; when set, the backend is fixed from the
        start (``Restorer.prepare_optimized`` compiles it at set-up); empty: the first optimized
        request fixes it. Raises ``ConfigError`` for a backend this device cannot run.
        """
        self.device = device
        self.safe_nets = nets
        self._optimized: dict[bool, Nets] = {}  # mixed precision -> optimized nets
        self._backend: str | None = compile_backend or None
        self._backend_setting = compile_backend
        self._lock = threading.Lock()
        self._mixed_precision_setting = mixed_precision
        self._mixed_precision_pays: bool | None = None
        if compile_backend in CUDA_ONLY_BACKENDS and device.type != "cuda":
            raise ConfigError(
                f"CODEFORMER_COMPILE_BACKEND={compile_backend} needs a CUDA GPU; this process runs on "
                f"{device}. Unset it or choose another backend"
            )
        if device.type == "cuda":
            # the official numerics unless a call asks for more (cuda_numerics)
            _set_cuda_fast_math(False)

    @property
    def mixed_precision(self) -> bool:
        """Whether requests of a mixed-precision profile get it here (decided on first use, then fixed)."""
        if self._mixed_precision_pays is None:
            self._mixed_precision_pays = mixed_precision_pays(self.device, self._mixed_precision_setting)
        return self._mixed_precision_pays

    @property
    def compile_backend(self) -> str | None:
        """The backend of the optimized nets, or None before the first optimized request."""
        return self._backend

    def check_backend(self, backend: str) -> None:
        """Raise ``ConfigError`` if ``backend`` cannot serve an optimized request in this process."""
        if backend in CUDA_ONLY_BACKENDS and self.device.type != "cuda":
            raise ConfigError(
                f"compile_backend={backend!r} needs a CUDA GPU; this process runs on {self.device}"
            )
        if self._backend is not None and backend != self._backend:
            fixed_by = (
                "by CODEFORMER_COMPILE_BACKEND"
                if self._backend_setting
                else "for this process (set by the first optimized request)"
            )
            raise ConfigError(
                f"compile_backend is fixed to {self._backend!r} {fixed_by}; got {backend!r}. "
                f"Send compile_backend={self._backend!r} or restart the server with another setting"
            )

    def nets_for(self, stability: Stability, backend: str, mixed_precision: bool = False) -> Nets:
        """The nets a request with these settings runs on."""
        if not stability.compiled:
            return self.safe_nets
        self.check_backend(backend)
        with self._lock:
            self.check_backend(backend)  # another thread may have initialised it meanwhile
            if mixed_precision not in self._optimized:
                self._optimized[mixed_precision] = self._build_optimized(backend, mixed_precision)
                self._backend = backend
        return self._optimized[mixed_precision]

    def _build_optimized(self, backend: str, mixed_precision: bool) -> Nets:
        conv_dtype = autocast_dtype(self.device) if mixed_precision else torch.float32
        log.info(
            "initialising the optimized runtime: channels_last, convolutions in %s, compile_backend=%s",
            str(conv_dtype).removeprefix("torch."),
            backend,
        )
        safe = self.safe_nets
        nets = Nets(
            codeformer=self._optimized_copy(safe.codeformer, conv_dtype),
            # the detector always runs in float32: the same faces in every profile
            retinaface=self._optimized_copy(safe.retinaface, torch.float32),
            parsenet=self._optimized_copy(safe.parsenet, conv_dtype),
        )
        if backend == "none":
            return nets
        # CodeFormer and ParseNet always see 512x512 inputs: compile them. The detector sees
        # a new shape per photo size, and would recompile for each; it stays eager.
        return Nets(
            codeformer=compile_net(nets.codeformer, backend),
            retinaface=nets.retinaface,
            parsenet=compile_net(nets.parsenet, backend),
        )

    @staticmethod
    def _optimized_copy(net: nn.Module, conv_dtype: torch.dtype) -> nn.Module:
        """A channels_last copy (safe requests keep the nets as loaded), convolutions in ``conv_dtype``.

        Autocast casts convolution weights to its dtype on every forward; storing them in
        that dtype gives the same numbers without the copies. Everything else (norms, the
        transformer, the codebook) keeps float32 parameters, as under autocast.
        """

        def optimized_tensor(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
            if isinstance(module, nn.Conv2d) and tensor.is_floating_point():
                tensor = tensor.to(conv_dtype)
            # what Module.to(memory_format=...) converts: 4-D tensors only
            return tensor.to(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor

        return replace_tensors(copy.deepcopy(net), optimized_tensor)


# torch.compile entries of one function share one cache and one recompile limit (8) by
# default, and modules are guarded by type: the float32 and the mixed-precision copies of
# CodeFormer count against one limit, and past it dynamo runs the rest eager with one
# warning. torch 2.14 gives each compiled copy its own count, and each copy of CodeFormer
# needs two graphs per face batch size (1, 2, 4: six); older versions cannot isolate the
# copies, and there set-up stops with a ConfigError (``pipeline.warm_compiled``) when both
# precisions are compiled.
ISOLATES_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def compile_options(backend: str) -> dict[str, object]:
    """``torch.compile``'s keyword arguments for ``backend``, a ``COMPILE_BACKENDS`` name other than none.

    Static shapes (``dynamic=False``): ``FaceBatchNet`` pads every chunk to one of a few
    batch sizes, each its own graph. Without it dynamo would make the batch dimension
    symbolic at the second size it met ("automatic dynamic"), and the graph-replaying
    backends record one graph per size whatever the symbols say.

    ``inductor-cudagraphs``: Inductor's generated kernels, the whole forward recorded as a
    CUDA graph per shape and replayed: one launch per forward instead of about a thousand.
    ``mode="reduce-overhead"`` is torch's public name for that (in torch 2.14 exactly
    ``options={"triton.cudagraphs": True}``, ``torch._inductor.list_mode_options()``); the
    graphs live in CUDA graph trees, with outputs overwritten at the next replay, which
    ``FaceBatchNet`` allows for.
    """
    if backend == "inductor-cudagraphs":
        return {"backend": "inductor", "mode": "reduce-overhead", "dynamic": False}
    return {"backend": backend, "dynamic": False}


def compile_net(net: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(net, **compile_options(backend))``, counting its recompiles apart where torch can.

    Called on the thread that will run the net (the scheduler's device thread).
    """
    if backend in GRAPH_REPLAYING_BACKENDS:
        give_this_thread_cudagraph_trees()
    if ISOLATES_RECOMPILES:
        return torch.compile(net, **compile_options(backend), isolate_recompiles=True)
    return torch.compile(net, **compile_options(backend))


def load_compile_cache(path: Path) -> int:
    """Put the compile artifacts saved in ``path`` into this process's caches; how many (0: no file).

    ``torch.compiler.load_cache_artifacts``: Inductor's compiled graphs and kernels (and,
    under the graph-replaying backend, its autotuning results), so that compiling the same
    nets on the same kind of device and torch build skips code generation and autotuning;
    dynamo still traces each net. Artifacts of another build are not used (torch keys them).
    """
    if not path.is_file():
        return 0
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    return 0 if info is None else sum(len(keys) for keys in info.artifacts.values())


def save_compile_cache(path: Path) -> int:
    """Write what this process compiled to ``path`` (``torch.compiler.save_cache_artifacts``); how many.

    Written whole or not at all (a temporary file renamed); nothing compiled writes nothing.
    """
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, info = saved
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return sum(len(keys) for keys in info.artifacts.values())


def give_this_thread_cudagraph_trees() -> None:
    """Make CUDA graph trees usable on the calling thread, as torch 2.14 does by itself.

    The trees keep their state in thread-local containers. Before torch 2.14 (e.g. 2.11)
    only the thread that imported ``torch._inductor.cudagraph_trees`` (and autograd's
    threads) had them, so the cudagraphs backend failed on the scheduler's device thread
    with a bare ``AssertionError`` (``_is_key_in_tls``), as a GPU run showed. Here the thread
    gets containers of its own; where torch already gave it some, nothing changes.
    """
    from torch._inductor import cudagraph_trees

    if hasattr(cudagraph_trees.local, "tree_manager_containers"):
        return
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    cudagraph_trees.local.tree_manager_containers = {}
    cudagraph_trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)


def replace_tensors(net: nn.Module, convert: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> nn.Module:
    """Replace each parameter and buffer ``t`` of ``net``'s modules by ``convert(module, t)``, in place.

    ``Module.to`` cannot convert tensor subclasses such as the fake CUDA tensors the
    device-placement tests run on (it swaps them, which their weak references forbid);
    setting the converted tensors works for every kind. A tensor shared by several modules
    is converted once and stays shared.
    """
    converted: dict[int, torch.Tensor] = {}
    for module in net.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in converted:
                with torch.no_grad():
                    converted[id(param)] = nn.Parameter(convert(module, param), param.requires_grad)
            setattr(module, name, converted[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if id(buffer) not in converted:
                converted[id(buffer)] = convert(module, buffer)
            setattr(module, name, converted[id(buffer)])
    return net
