"""One owner for the device: requests overlap, the nets run one batch at a time.

Several requests may be in ``Restorer.restore`` at once (Cog's concurrent predictions, each
on a thread of its own). Their host work (prepare, align, paste-back) runs on their own
threads; every torch call goes through the process's ``DeviceScheduler``, which runs them
one at a time on its one thread, the device thread, so that the device never holds two
requests' activations and a request's host work overlaps another's forward. How that thread
is started is the caller's (``start_thread``): on a CPU, a thread on glibc's main malloc
arena (``codeformer.host_memory``).

Faces batch across requests: CodeFormer and ParseNet calls that wait at the same stage with
the same settings (fidelity, precision, input type) go into one forward, up to
``Settings.face_batch`` faces. When a batch is not full and other requests may still bring
faces to its stage (requests in progress that have not passed it: ``finished``), the batch
waits up to ``Settings.batch_wait_ms`` from its first call's arrival; a lone request never
waits, and the device never idles meanwhile: any other queued call runs first. On a CPU
the face batch is 1 (batching does not pay there, see ``config.DEFAULT_FACE_BATCH``), so no
wait ever happens. On a GPU the device thread copies no pixels on the host: a batch's
payloads arrive on the device (the device pixel path) or staged in pinned memory by their
request's thread (``runtime.staged``), and are uploaded and joined with queued copies.
Nor does it wait for a call's copies to the host: a call's results on their way there
(``runtime.Download``s, alone or in a tuple) are waited for by the request's thread, once
the device thread has gone on to the next call.

A batch that fails is run again one request at a time, so that one request's bad input
cannot fail another's. The retry runs once the failed forward's tensors are freed: an
exception's traceback holds the frames of the call that raised it, and with them its
tensors (a batch that ran out of device memory would otherwise retry next to its own
activations). For the same reason an error is handed to its request without its traceback
(an unexpected one carries the device thread's traceback as text, in a note). A sticky
device error (``codeformer.device_faults``) is not retried: the scheduler fails every call
from then on and hands the error to ``on_broken_device``, which stops the process.
A cancelled request's jobs are dropped before they run; a job already running finishes (at
most one forward), and its result is discarded.

Each caller can read how many of its forwards it shared with other requests
(``shared_forwards``, per thread: a request's device calls come from its own thread).
``in_progress`` says how many requests are inside ``caller()``; tests that need faces to
meet hold the device thread with a call of their own until enough are (tests/gated_predictor.py).

``PixelBudget`` is the admission side: a request holds its pixels (the sum of its images'
sizes, read from the headers) from decode to encode, and waits, in arrival order, while
the pixels in flight would go over ``Settings.max_pixels_in_flight``. One request alone is
always admitted. This bounds host memory whatever the number of concurrent requests.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from codeformer.device_faults import is_broken_device, is_out_of_memory, stop_worker
from codeformer.errors import CodeFormerError, DeviceBrokenError, RequestCancelled
from codeformer.host_memory import start_thread as start_plain_thread
from codeformer.runtime import arrived

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.05  # how often a waiting request looks at its cancel flag
# how long stopping (at exit, or when the Restorer goes) waits for a call still running
STOP_WAIT_S = 10.0


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise ``RequestCancelled`` when the request's cancel flag is set."""
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("the prediction was cancelled")


def without_frames(error: Exception) -> Exception:
    """``error`` with its traceback, and those of the exceptions it chains, dropped; in place.

    What a traceback holds (the frames of the failed call, their tensors) is freed once the
    ``except`` block that caught ``error`` ends. An error that is not one of ours keeps where
    it was raised as text (a note), for the log of the request that re-raises it.
    """
    if not isinstance(error, CodeFormerError) and not is_out_of_memory(error):
        error.add_note("raised on the device thread:\n" + "".join(traceback.format_tb(error.__traceback__)))
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        chained = pending.pop()
        if id(chained) not in seen:
            seen.add(id(chained))
            chained.__traceback__ = None
            pending.extend(link for link in (chained.__cause__, chained.__context__) if link is not None)
    return error


def _joined(payloads: list[Any], device: torch.device | None) -> Any:
    """The parts of batched jobs' items (arrays, or tensors), in order, joined along their first axis.

    Host arrays (on a CPU) are joined on the host. Tensors are joined on ``device`` with
    ``torch.cat``, queued like any kernel: device tensors (the device pixel path's crops and
    faces) as they are, host tensors (the host path's, staged in pinned memory by their
    request's thread: ``runtime.staged``) uploaded part by part first, each copy queued
    without blocking. One part is uploaded alone; an array alone is returned as it is.
    """
    if isinstance(payloads[0], np.ndarray):
        return payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
    parts = [part if device is None else part.to(device, non_blocking=True) for part in payloads]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows(results: Any, start: int, end: int) -> Any:
    """Rows ``start:end`` of a batched call's results: of each item of a tuple (None stays None)."""
    if isinstance(results, tuple):
        return tuple(_rows(item, start, end) for item in results)
    return None if results is None else results[start:end]


def _attempt(function: Callable[[], Any]) -> tuple[Any, Exception | None]:
    """(``function()``, None), or (None, its exception without frames) when it raises."""
    try:
        return function(), None
    except Exception as exc:  # noqa: BLE001 - handed on: to its request, or to a retry
        return None, without_frames(exc)


class _Job:
    """A call waiting for the device; ``key`` is set when it may share a forward with others."""

    def __init__(
        self,
        function: Callable[..., Any],
        payload: Any,
        key: Hashable | None,
        cancel: threading.Event | None,
    ) -> None:
        self.function, self.key, self.cancel = function, key, cancel
        # a batchable job's items, as parts of one request to join in order (``batched``)
        self.parts: list[Any] = payload if isinstance(payload, list) else [payload]
        self.size = sum(len(part) for part in self.parts) if key is not None else 1
        self.caller = threading.get_ident()  # jobs are made on their request's thread
        self.queued_at = time.monotonic()
        self.result: Any = None
        self.error: Exception | None = None
        self.shared = False  # ran in one forward with other callers' jobs
        self.done = threading.Event()

    def finish(self, result: Any = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class DeviceScheduler:
    """Runs device calls one at a time on its own thread, batching faces across callers.

    ``start_thread(run)`` starts the device thread, which runs ``run``, and returns it (by
    default a plain daemon thread). ``on_broken_device(error)`` is called once after a sticky device
    error: on the device thread, or on a thread of its own when the error surfaced where a
    request waited for its copies (``_submit``); by default it stops the process
    (``device_faults.stop_worker``). ``device``: where batched calls' tensor payloads are
    joined (``_joined``); None leaves them where they are.
    """

    def __init__(
        self,
        batch_size: int,
        batch_wait_s: float,
        on_broken_device: Callable[[Exception], None] = stop_worker,
        start_thread: Callable[[Callable[[], None]], threading.Thread] = start_plain_thread,
        device: torch.device | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.device = device
        self.batch_wait_s = batch_wait_s
        self._on_broken_device = on_broken_device
        self._queue: list[_Job] = []
        self._condition = threading.Condition()
        # requests inside a ``caller()`` block (by thread) -> the stages they have passed
        self._callers: dict[int, set[Hashable]] = {}
        self._stopping = False
        self._broken: str | None = None  # why every call fails, after a sticky device error
        self._stop_started = False  # a sticky error has been handed to on_broken_device
        self.batches_run = 0  # forwards of batchable calls, and the jobs they served (for tests, logs)
        self.jobs_batched = 0
        self._per_thread = threading.local()  # ``shared``: forwards each caller thread shared
        self._thread = start_thread(self._serve)

    @contextmanager
    def caller(self) -> Iterator[None]:
        """Marks a request in progress on this thread: while it has not passed a stage
        (``finished``), part-filled batches of that stage may wait for its faces."""
        ident = threading.get_ident()
        with self._condition:
            self._callers[ident] = set()
            self._condition.notify_all()  # batches waiting may now wait for this request too
        try:
            yield
        finally:
            with self._condition:
                del self._callers[ident]
                self._condition.notify_all()

    def finished(self, stage: Hashable) -> None:
        """This thread's request brings no more calls of ``stage`` (a batch key's first
        element): batches of that stage stop waiting for it."""
        with self._condition:
            self._callers.get(threading.get_ident(), set()).add(stage)
            self._condition.notify_all()

    @property
    def in_progress(self) -> int:
        """How many requests are inside a ``caller()`` block now."""
        with self._condition:
            return len(self._callers)

    def shared_forwards(self) -> int:
        """How many forwards the calling thread's jobs have shared with other callers' so far."""
        return getattr(self._per_thread, "shared", 0)

    def call(self, function: Callable[..., Any], *args: Any, cancel: threading.Event | None = None) -> Any:
        """``function(*args)`` on the device, after the calls queued before it; its result."""
        return self._submit(_Job(lambda: function(*args), None, None, cancel))

    def batched(
        self,
        key: Hashable,
        function: Callable[[Any], Any],
        items: Any,
        cancel: threading.Event | None = None,
    ) -> Any:
        """``function(items)``, maybe run on ``items`` joined with other callers' items of the same ``key``.

        ``items``: an array or a tensor, or a list of them, parts of this request's items that
        the device thread joins in order, with the batch (``_joined``). ``function`` maps N
        items to N results (rows, or a tuple of rows: ``_rows``), each result depending on
        its own item only (up to floating-point batching effects); callers with equal keys
        pass equal functions.
        """
        job = _Job(function, items, key, cancel)
        if job.size == 0:
            return arrived(function(_joined(job.parts, None)))
        return self._submit(job)

    def stop(self) -> None:
        """End the device thread after the calls already queued, and wait for it to end.

        Waiting matters at interpreter exit: a thread that ran torch or OpenCV work and is still
        alive while the C++ runtime tears down aborts the process ("terminate called without an
        active exception", exit status 134).
        """
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_WAIT_S)

    def _submit(self, job: _Job) -> Any:
        check_cancel(job.cancel)
        if threading.current_thread() is self._thread:
            raise RuntimeError("a device call made from the device thread would wait for itself")
        with self._condition:
            if self._broken is not None:
                raise DeviceBrokenError(self._broken)
            self._queue.append(job)
            self._condition.notify_all()
        job.done.wait()
        if job.shared:
            self._per_thread.shared = self.shared_forwards() + 1
        if job.error is not None:
            raise job.error
        try:
            return arrived(job.result)  # the copies the call queued, waited for here
        except Exception as exc:
            broken = self._broken_by(exc)  # an asynchronous device error surfaces at the wait
            if broken is None:
                raise
            self._stop_broken(exc, wait=False)
            raise DeviceBrokenError(broken) from None

    def _stop_broken(self, error: Exception, wait: bool = True) -> None:
        """``on_broken_device(error)``, once whichever thread saw the error first. The device
        thread calls it itself (``wait``); a request's thread, on a thread of its own, so that
        its request answers meanwhile."""
        with self._condition:
            started, self._stop_started = self._stop_started, True
        if started:
            return
        if wait:
            self._on_broken_device(error)
        else:
            threading.Thread(
                target=self._on_broken_device, args=(error,), name="broken-device", daemon=True
            ).start()

    # -- the device thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._condition:
                group = self._next_group()
                if group is None:
                    return
            self._run(group)

    def _next_group(self) -> list[_Job] | None:
        """The next jobs to run together (called holding the condition); None when stopping."""
        while True:
            self._drop_cancelled()
            if self._queue:
                break
            if self._stopping:
                return None
            self._condition.wait()
        first = self._queue[0]
        if first.key is None:
            self._queue.pop(0)
            return [first]
        # a part-filled batch waits from its first call's arrival, however often others run first
        deadline = first.queued_at + self.batch_wait_s
        while True:
            group = self._gather(first.key)
            left = deadline - time.monotonic()
            if (
                sum(job.size for job in group) >= self.batch_size
                or not self._may_bring(first.key, group)
                or left <= 0
            ):
                break
            # the device never idles while a call is ready: the first other queued call runs
            # (with the calls it batches with) while this batch waits
            other = next((job for job in self._queue if job not in group), None)
            if other is not None:
                group = [other] if other.key is None else self._gather(other.key)
                break
            self._condition.wait(None if left == float("inf") else left)  # an unbounded wait: no timeout
            self._drop_cancelled()
            if first not in self._queue:  # cancelled while waiting
                return self._next_group()
        for job in group:
            self._queue.remove(job)
        return group

    def _may_bring(self, key: Hashable, group: list[_Job]) -> bool:
        """Whether a request in progress may still bring calls with ``key``'s stage: one with
        no call in ``group`` that has not passed the stage (called holding the condition)."""
        stage = key[0] if isinstance(key, tuple) and key else key
        waiting = {job.caller for job in group}
        return any(ident not in waiting and stage not in passed for ident, passed in self._callers.items())

    def _gather(self, key: Hashable) -> list[_Job]:
        """Queued jobs with ``key``, oldest first, up to the batch size (the first always)."""
        group: list[_Job] = []
        faces = 0
        for job in self._queue:
            if job.key == key and (not group or faces + job.size <= self.batch_size):
                group.append(job)
                faces += job.size
        return group

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._queue if job.cancel is not None and job.cancel.is_set()]:
            self._queue.remove(job)
            job.finish(error=RequestCancelled("the prediction was cancelled"))

    def _run(self, group: list[_Job]) -> None:
        if len(group) == 1:
            self._run_alone(group[0])
            return
        sizes = [job.size for job in group]
        payloads = [part for job in group for part in job.parts]
        # joined inside the attempt: a join that runs out of memory fails like the forward
        results, error = _attempt(lambda: group[0].function(_joined(payloads, self.device)))
        if error is not None:
            broken = self._broken_by(error)
            if broken is not None:
                for job in group:
                    job.finish(error=DeviceBrokenError(broken))
                self._stop_broken(error)
                return
            # outside the except block: the failed forward's tensors are freed by now
            log.warning(
                "a batch of %d requests failed (%s: %s); running them one at a time",
                len(group),
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            del error
            for job in group:
                self._run_alone(job)
            return
        self.batches_run += 1
        self.jobs_batched += len(group)
        for job in group:
            job.shared = True
        log.info("%d requests shared a forward of %d faces", len(group), sum(sizes))
        bounds = np.cumsum([0, *sizes])
        for job, start, end in zip(group, bounds[:-1], bounds[1:], strict=True):
            job.finish(_rows(results, start, end))

    def _run_alone(self, job: _Job) -> None:
        if job.cancel is not None and job.cancel.is_set():
            job.finish(error=RequestCancelled("the prediction was cancelled"))
            return
        if self._broken is not None:  # a sticky error ended an earlier job of this group
            job.finish(error=DeviceBrokenError(self._broken))
            return
        if job.key is None:
            result, error = _attempt(job.function)
        else:
            result, error = _attempt(lambda: job.function(_joined(job.parts, self.device)))
            if error is None:
                self.batches_run += 1
                self.jobs_batched += 1
        broken = None if error is None else self._broken_by(error)
        job.finish(result, error if broken is None else DeviceBrokenError(broken))
        if broken is not None and error is not None:
            self._stop_broken(error)  # its request has its answer by now

    def _broken_by(self, error: Exception) -> str | None:
        """Why the device is broken if ``error`` broke it, else None.

        When it did, every queued call fails, and so does every later one; the caller hands
        ``error`` to ``on_broken_device`` once the calls that raised it have their answer.
        """
        if not is_broken_device(error):
            return None
        reason = (
            f"the GPU failed and cannot recover ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "the worker restarts: send the request again"
        )
        with self._condition:
            self._broken = reason
            queued, self._queue = self._queue, []
        for job in queued:
            job.finish(error=DeviceBrokenError(reason))
        return reason


class PixelBudget:
    """Admission by pixels in flight: requests wait, in arrival order, while they would not fit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._waiting: collections.deque[object] = collections.deque()
        self._condition = threading.Condition()

    def _fits(self, pixels: int) -> bool:
        return self.in_flight == 0 or self.in_flight + pixels <= self.limit

    @contextmanager
    def hold(self, pixels: int, cancel: threading.Event | None = None) -> Iterator[float]:
        """Hold ``pixels`` for the block; yields the ms spent waiting for admission."""
        start = time.perf_counter()
        ticket = object()
        with self._condition:
            self._waiting.append(ticket)
            try:
                while not (self._waiting[0] is ticket and self._fits(pixels)):
                    check_cancel(cancel)
                    self._condition.wait(WAIT_SLICE_S)
            finally:
                self._waiting.remove(ticket)
                self._condition.notify_all()
            self.in_flight += pixels
        try:
            yield (time.perf_counter() - start) * 1000.0
        finally:
            with self._condition:
                self.in_flight -= pixels
                self._condition.notify_all()
