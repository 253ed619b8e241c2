"""Fake CUDA tensors for the device-placement tests: nets on a GPU this machine does not have.

``torch._subclasses.fake_tensor.FakeTensorMode`` propagates shapes, dtypes and devices
without computing anything, and refuses a CPU tensor meeting a CUDA one
(``FakeTensorDeviceMismatchError``). Two steps make CUDA work without a GPU: parameters and
buffers are converted one by one (``Module.to`` cannot move fake tensors), and
``torch.autocast("cuda")`` is built while ``torch.cuda.is_available()`` reports True
(otherwise it warns and disables itself). CUDA events are stand-ins (``FakeEvents``) that
note where they were recorded and waited for. ``DeviceLog`` records what crosses between
host and device while the code under test runs.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from codeformer.runtime import replace_tensors

CUDA = torch.device("cuda", 0)


def fake_cuda_mode() -> FakeTensorMode:
    """A fake-tensor mode for stage code.

    Real tensors made inside (``torch.from_numpy``) are accepted and become fake CPU
    tensors; the shape environment lets data-dependent sizes (nonzero, boolean masks, NMS)
    stay symbolic.
    """
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def to_fake_cuda(net: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``net`` with each parameter and buffer replaced by a fake copy on CUDA, in place.

    Static shapes: the mode's shape environment would give them symbolic sizes, which
    ``copy.deepcopy`` (the runtime's optimized copies) cannot handle.
    """

    def fake_cuda_copy(_module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        return mode.from_tensor(tensor, static_shapes=True).to(CUDA)

    with mode:
        return replace_tensors(net, fake_cuda_copy)


class FakeEvents:
    """Stands in for ``torch.cuda.Event`` and ``torch.cuda.current_stream`` (which need a GPU):
    notes the stream (by its device) of each ``record``, and the thread of each ``synchronize``."""

    def __init__(self) -> None:
        self.recorded: list[torch.device | None] = []
        self.waited: list[str] = []

    def __call__(self, *_args: object, **_kwargs: object) -> FakeEvents:
        return self  # every event made is this one: the test reads one log

    @staticmethod
    def current_stream(device: torch.device | None = None) -> torch.device | None:
        return device  # a stream stands for its device

    def record(self, stream: torch.device | None = None) -> None:
        self.recorded.append(stream)

    def synchronize(self) -> None:
        self.waited.append(threading.current_thread().name)


@contextlib.contextmanager
def fake_cuda_events() -> Iterator[FakeEvents]:
    """``torch.cuda.Event`` and ``current_stream`` are a ``FakeEvents``' in the block."""
    events = FakeEvents()
    with (
        mock.patch.object(torch.cuda, "Event", events),
        mock.patch.object(torch.cuda, "current_stream", events.current_stream),
    ):
        yield events


@contextlib.contextmanager
def cuda_reported_available() -> Iterator[None]:
    """``torch.cuda.is_available()`` is True in the block, so that ``torch.autocast("cuda")`` engages."""
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        yield


# Under inference mode composite ops reach the dispatch mode undecomposed: ``Tensor.to``
# as aten.to (aten._to_copy outside it), ``F.conv2d`` as aten.conv2d (aten.convolution)
COPY_OPS = ("aten.to", "aten._to_copy", "aten.copy_")
CONVOLUTION_OPS = ("aten.conv2d", "aten.convolution")


DIVISION_OPS = ("aten.div", "aten.div_")
# a view op that stands for a tensor made on the host (``torch.tensor``): not exempt as a view
HOST_MADE = ("aten.lift_fresh",)
# ops whose output size depends on the data: on CUDA the host waits for the device to know it
DATA_DEPENDENT_OPS = ("aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "torchvision.nms")


def _inexact_on_cuda(numerator: torch.Tensor, divisor: object) -> bool:
    """Whether CUDA's multiply by ``1 / divisor`` can differ from the true division.

    So it can for a float tensor on CUDA and a host number that is not a power of two
    (whose reciprocal is inexact).
    """
    if not isinstance(divisor, float | int) or divisor == 0:
        return False
    exact_reciprocal = math.frexp(divisor)[0] in (0.5, -0.5)
    return numerator.device.type == "cuda" and numerator.is_floating_point() and not exact_reciprocal


def _bytes(tensor: torch.Tensor) -> int | None:
    """A tensor's size in bytes, or None when its shape is symbolic (a data-dependent size)."""
    try:
        return int(tensor.numel()) * tensor.element_size()
    except (TypeError, RuntimeError):
        return None


def _devices(tree: object) -> list[str]:
    return [leaf.device.type for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


@dataclass
class DeviceLog(TorchDispatchMode):
    """Every aten op run in the block, sorted into what matters for device placement.

    ``uploads``/``downloads``: copies host->device and device->host (``_to_copy``, ``copy_``),
    their sizes in ``upload_bytes``/``download_bytes``;
    ``pinned_uploads``: the uploads that copy from pinned host memory without blocking;
    ``pinned_downloads``: the downloads that copy into pinned host memory without blocking
    (every other download blocks the thread that makes it until the device has run it);
    ``host_ops``: every other op with a CPU tensor among its inputs or outputs (a tensor
    made or computed on the host), except views (which compute nothing) and the staging of
    an upload in pinned memory (``staging``); ``waits``: ops on CUDA tensors whose output size depends
    on the data (nonzero, a boolean index, NMS, ``.item()``), each a wait for the device;
    ``dtype_clashes``: convolutions whose input and weight
    dtypes differ, which CUDA refuses but fake tensors let through; ``inexact_divisions``:
    CUDA float tensors divided by a host number that is not a power of two, which CUDA
    computes as a multiply by the reciprocal and so can differ from the CPU in the last bit.
    """

    uploads: list[str] = field(default_factory=list)
    # bytes of each upload and download, in order (None where the size is symbolic: data-dependent)
    upload_bytes: list[int | None] = field(default_factory=list)
    download_bytes: list[int | None] = field(default_factory=list)
    pinned_uploads: list[str] = field(default_factory=list)
    pinned_downloads: list[str] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    host_ops: list[str] = field(default_factory=list)
    dtype_clashes: list[str] = field(default_factory=list)
    convolution_dtypes: list[torch.dtype] = field(default_factory=list)
    inexact_divisions: list[str] = field(default_factory=list)
    waits: list[str] = field(default_factory=list)  # data-dependent ops on CUDA tensors (a sync each)

    def __post_init__(self) -> None:
        super().__init__()
        # host tensors allocated pinned in the block, by id (fake tensors cannot say ``is_pinned``)
        self._pinned: dict[int, weakref.ref[torch.Tensor]] = {}

    def _is_pinned(self, tensor: object) -> bool:
        held = self._pinned.get(id(tensor))
        return held is not None and held() is tensor

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple[type, ...],
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        inputs, outputs = _devices((args, kwargs)), _devices(out)
        if name in COPY_OPS and set(inputs) != set(outputs):
            source = inputs[-1] if name == "aten.copy_" else inputs[0]  # copy_(destination, source)
            (self.uploads if source == "cpu" else self.downloads).append(name)
            copied = args[0] if name == "aten.copy_" else out  # the copy's destination
            (self.upload_bytes if source == "cpu" else self.download_bytes).append(_bytes(copied))
            if name == "aten.copy_":  # copy_(destination, source, non_blocking=False)
                source_tensor, non_blocking = args[1], args[2:3] == (True,)
            else:
                source_tensor, non_blocking = args[0], bool(kwargs.get("non_blocking"))
            if source == "cpu" and non_blocking and self._is_pinned(source_tensor):
                self.pinned_uploads.append(name)
            if source != "cpu" and non_blocking and self._is_pinned(args[0]):  # copy_ into pinned memory
                self.pinned_downloads.append(name)
        elif name == "aten.empty" and kwargs.get("pin_memory"):
            self._pinned[id(out)] = weakref.ref(out)
            self.staging.append(name)
        elif name == "aten.copy_" and self._is_pinned(args[0]):
            self.staging.append(name)  # filling a pinned buffer from host memory
        elif "cpu" in inputs + outputs and name != "prim.device" and (name in HOST_MADE or not func.is_view):
            self.host_ops.append(name)
        boolean_index = name == "aten.index" and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in tree_leaves(args[1:])
        )
        if (name in DATA_DEPENDENT_OPS or boolean_index) and "cuda" in inputs:
            self.waits.append(name)
        if name in DIVISION_OPS and _inexact_on_cuda(*args[:2]):
            self.inexact_divisions.append(f"{name} by {args[1]}")
        if name in CONVOLUTION_OPS:
            data, weight = args[0], args[1]
            self.convolution_dtypes.append(data.dtype)
            if data.dtype != weight.dtype:
                self.dtype_clashes.append(f"input {data.dtype}, weight {weight.dtype}")
        return out
