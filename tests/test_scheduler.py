"""``codeformer.scheduler``: one device thread, faces batched across callers, failures and
cancels kept to their request, admission by pixels in flight.

Callers are plain threads; the "device" functions record what they were given. Thread
joins carry a generous deadline only to turn a hang into a failure.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from helpers import GatedEvent, hold_device_until

from codeformer.errors import DeviceBrokenError, RequestCancelled
from codeformer.runtime import Download
from codeformer.scheduler import DeviceScheduler, PixelBudget

HANG_S = 30.0  # a join that takes this long means the scheduler hangs


class Recorder:
    """A batchable device function: doubles its items, notes each batch and the thread it ran on."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.threads: set[int] = set()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, items: np.ndarray) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if (items < 0).any():
                raise ValueError("negative item")
            self.batches.append(items.tolist())
            self.threads.add(threading.get_ident())
            return items * 2
        finally:
            with self._lock:
                self.running -= 1


def run_callers(scheduler: DeviceScheduler, work: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
    """Each item of ``work`` on its own thread inside ``scheduler.caller()``, all started together.

    Returns ("ok", result) or ("error", exception) per item, in order.
    """
    outcomes: list[tuple[str, Any]] = [("missing", None)] * len(work)
    inside = threading.Barrier(len(work))

    def caller(index: int) -> None:
        with scheduler.caller():
            inside.wait()  # every caller counts as in flight before any submits
            try:
                outcomes[index] = ("ok", work[index]())
            except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
                outcomes[index] = ("error", exc)

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
        assert not thread.is_alive(), "a caller hung"
    return outcomes


def test_faces_of_callers_in_flight_share_one_forward_and_each_gets_its_own_results() -> None:
    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=HANG_S)
    device = Recorder()
    items = [np.array([1.0]), np.array([2.0, 3.0]), np.array([4.0])]
    outcomes = run_callers(scheduler, [lambda i=i: scheduler.batched("k", device, i) for i in items])
    # the first waits for the others (they are in flight), then one forward serves all three
    assert len(device.batches) == 1
    assert sorted(device.batches[0]) == [1.0, 2.0, 3.0, 4.0]
    for (status, result), sent in zip(outcomes, items, strict=True):
        assert status == "ok"
        np.testing.assert_array_equal(result, sent * 2)
    assert (scheduler.batches_run, scheduler.jobs_batched) == (1, 3)
    scheduler.stop()


def test_a_callers_parts_are_joined_in_order_once_with_the_batch() -> None:
    # a request with faces in several images hands them as parts: one join, on the device thread
    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=HANG_S)
    device = Recorder()
    sent = [[np.array([1.0, 2.0]), np.array([3.0])], np.array([4.0])]
    outcomes = run_callers(
        scheduler, [lambda items=items: scheduler.batched("k", device, items) for items in sent]
    )
    assert len(device.batches) == 1 and sorted(device.batches[0]) == [1.0, 2.0, 3.0, 4.0]
    assert [result.tolist() for _, result in outcomes] == [[2.0, 4.0, 6.0], [8.0]]
    [(_, alone)] = run_callers(
        scheduler, [lambda: scheduler.batched("k", device, [np.array([5.0]), np.array([6.0])])]
    )
    assert device.batches[-1] == [5.0, 6.0] and alone.tolist() == [10.0, 12.0]
    scheduler.stop()


def test_a_batch_holds_at_most_the_batch_size_and_keys_never_mix() -> None:
    scheduler = DeviceScheduler(batch_size=2, batch_wait_s=HANG_S)
    device = Recorder()
    jobs = [("a", 1.0), ("a", 2.0), ("a", 3.0), ("b", 10.0)]
    outcomes = run_callers(
        scheduler, [lambda k=k, v=v: scheduler.batched(k, device, np.array([v])) for k, v in jobs]
    )
    assert all(status == "ok" for status, _ in outcomes)
    assert all(len(batch) <= 2 for batch in device.batches)
    assert sorted(value for batch in device.batches for value in batch) == [1.0, 2.0, 3.0, 10.0]
    for batch in device.batches:  # "b" (another fidelity, precision, ...) always alone
        assert batch == [10.0] or 10.0 not in batch
    scheduler.stop()


def test_a_lone_caller_does_not_wait_for_a_batch_to_fill() -> None:
    # a wait of an hour: the call returning at all shows nothing waited for it
    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=3600.0)
    device = Recorder()
    [(status, result)] = run_callers(scheduler, [lambda: scheduler.batched("k", device, np.array([5.0]))])
    assert status == "ok"
    np.testing.assert_array_equal(result, [10.0])
    scheduler.stop()


def test_device_calls_run_one_at_a_time_on_one_thread() -> None:
    scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0)
    device = Recorder()
    work: list[Callable[[], Any]] = [
        lambda v=v: scheduler.call(device, np.array([v])) for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    ]
    outcomes = run_callers(scheduler, work)
    assert [result.tolist() for _, result in outcomes] == [[2.0], [4.0], [6.0], [8.0], [10.0], [12.0]]
    assert device.most_running == 1
    assert device.threads == {scheduler._thread.ident}
    scheduler.stop()


def test_a_failing_batch_is_retried_alone_so_only_the_bad_request_fails() -> None:
    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=HANG_S)
    device = Recorder()
    items = [np.array([1.0]), np.array([-1.0]), np.array([3.0])]
    outcomes = run_callers(scheduler, [lambda i=i: scheduler.batched("k", device, i) for i in items])
    assert outcomes[0][0] == outcomes[2][0] == "ok"
    np.testing.assert_array_equal(outcomes[0][1], [2.0])
    np.testing.assert_array_equal(outcomes[2][1], [6.0])
    status, error = outcomes[1]
    assert status == "error" and isinstance(error, ValueError)
    # and the device serves the next request
    assert run_callers(scheduler, [lambda: scheduler.call(lambda: "next")]) == [("ok", "next")]
    scheduler.stop()


def test_a_cancelled_request_is_dropped_from_the_queue_and_the_others_run() -> None:
    scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0)
    release = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def blocking() -> str:
        started.set()
        release.wait(HANG_S)
        return "first"

    def queued(name: str) -> Callable[[], str]:
        def record() -> str:
            ran.append(name)
            return name

        return record

    cancel = threading.Event()
    outcomes: dict[str, tuple[str, Any]] = {}

    def submit(name: str, function: Callable[[], str], flag: threading.Event | None) -> None:
        try:
            outcomes[name] = ("ok", scheduler.call(function, cancel=flag))
        except RequestCancelled as exc:
            outcomes[name] = ("cancelled", exc)

    threads = [threading.Thread(target=submit, args=("first", blocking, None))]
    threads[0].start()
    assert started.wait(HANG_S)
    # two jobs wait behind the running one; one of them is cancelled before its turn
    for name, flag in (("cancelled", cancel), ("other", None)):
        threads.append(threading.Thread(target=submit, args=(name, queued(name), flag)))
        threads[-1].start()
    while len(scheduler._queue) < 2:
        threading.Event().wait(0.01)
    cancel.set()
    release.set()
    for thread in threads:
        thread.join(HANG_S)
    assert outcomes["first"] == ("ok", "first")
    assert outcomes["other"] == ("ok", "other")
    assert outcomes["cancelled"][0] == "cancelled"
    assert ran == ["other"]  # the cancelled job never ran
    with pytest.raises(RequestCancelled):  # a request cancelled before it asks is refused at once
        scheduler.call(queued("late"), cancel=cancel)
    scheduler.stop()


def test_a_device_call_from_the_device_thread_is_refused_not_deadlocked() -> None:
    scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0)
    with pytest.raises(RuntimeError, match="wait for itself"):
        scheduler.call(lambda: scheduler.call(lambda: None))
    scheduler.stop()


# -- failures on the device -------------------------------------------------------------------
@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    """Only reference counting frees objects in the test: what it shows cannot rest on a gc pass."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class OutOfMemoryDevice:
    """A batchable device function that runs out of memory on batches of more than one request.

    Each call first allocates its "activations" (a tensor, weakly referenced here); items of
    ``TOO_BIG`` run out of memory even alone. Each call notes which earlier calls' activations
    were still alive when it started.
    """

    TOO_BIG = 99.0

    def __init__(self) -> None:
        self.activations: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_start: list[int] = []

    def __call__(self, items: np.ndarray) -> np.ndarray:
        self.alive_at_start.append(sum(ref() is not None for ref in self.activations))
        activations = torch.ones(1 << 16)
        self.activations.append(weakref.ref(activations))
        if len(items) > 1 or (items == self.TOO_BIG).any():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return items * 2


@pytest.mark.usefixtures("no_cycle_collector")
def test_a_batch_out_of_memory_is_retried_once_its_tensors_are_freed_and_fails_only_its_request() -> None:
    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=HANG_S)
    device = OutOfMemoryDevice()
    items = [np.array([1.0]), np.array([OutOfMemoryDevice.TOO_BIG]), np.array([3.0])]
    outcomes = run_callers(scheduler, [lambda i=i: scheduler.batched("k", device, i) for i in items])
    # one batch of three, then each request alone: no call started next to another's activations
    assert len(device.alive_at_start) == 4
    assert device.alive_at_start == [0, 0, 0, 0]
    np.testing.assert_array_equal(outcomes[0][1], [2.0])
    np.testing.assert_array_equal(outcomes[2][1], [6.0])
    status, error = outcomes[1]
    assert status == "error" and isinstance(error, torch.OutOfMemoryError)
    # the request holds its error, but not the frames (and tensors) of the call that raised it
    assert all(ref() is None for ref in device.activations)
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame.f_code.co_name)
        traceback = traceback.tb_next
    assert "__call__" not in frames
    scheduler.stop()


def test_an_unexpected_error_reaches_its_request_with_the_device_traceback_as_text() -> None:
    scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0)

    def broken_stage() -> None:
        raise KeyError("boxes")

    with pytest.raises(KeyError, match="boxes") as raised:
        scheduler.call(broken_stage)
    assert any("broken_stage" in note for note in raised.value.__notes__)
    scheduler.stop()


ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ..."


def test_a_sticky_device_error_fails_every_later_call_and_is_handed_on_once() -> None:
    handed_on: list[BaseException] = []
    answered = threading.Event()
    answered_first: list[bool] = []

    def stop_the_worker(error: BaseException) -> None:
        handed_on.append(error)
        # the process would end here: the request that met the error has its answer by then
        answered_first.append(answered.wait(HANG_S))

    scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0, on_broken_device=stop_the_worker)
    ran: list[str] = []

    def forward() -> None:
        ran.append("forward")
        raise torch.AcceleratorError(ILLEGAL_ADDRESS)

    with pytest.raises(DeviceBrokenError, match="cannot recover .*an illegal memory access"):
        scheduler.call(forward)
    answered.set()
    while not answered_first:
        threading.Event().wait(0.01)
    assert answered_first == [True]
    assert [type(error) for error in handed_on] == [torch.AcceleratorError]
    # the device is not touched again: later calls fail at once, for every request
    with pytest.raises(DeviceBrokenError, match="an illegal memory access"):
        scheduler.call(lambda: ran.append("later"))
    with pytest.raises(DeviceBrokenError):
        scheduler.batched("k", Recorder(), np.array([1.0]))
    assert ran == ["forward"] and len(handed_on) == 1
    scheduler.stop()


def test_a_sticky_error_met_while_waiting_for_a_copy_fails_its_request_and_is_handed_on_once() -> None:
    """An asynchronous device error surfaces where the request waits for its copy (its thread)."""
    handed_on: list[tuple[BaseException, str]] = []
    scheduler = DeviceScheduler(
        batch_size=1,
        batch_wait_s=0.0,
        on_broken_device=lambda error: handed_on.append((error, threading.current_thread().name)),
    )
    event = GatedEvent(torch.AcceleratorError(ILLEGAL_ADDRESS))
    event.gate.set()
    with pytest.raises(DeviceBrokenError, match="cannot recover .*an illegal memory access"):
        scheduler.call(lambda: Download(torch.zeros(2), event))
    _wait_until(lambda: bool(handed_on))
    with pytest.raises(DeviceBrokenError):
        scheduler.call(lambda: None)
    assert [(type(error), thread) for error, thread in handed_on] == [
        (torch.AcceleratorError, "broken-device")
    ]
    scheduler.stop()


def test_a_sticky_error_in_a_shared_batch_is_not_retried_request_by_request() -> None:
    handed_on: list[BaseException] = []
    scheduler = DeviceScheduler(batch_size=8, batch_wait_s=HANG_S, on_broken_device=handed_on.append)
    calls: list[int] = []

    def forward(items: np.ndarray) -> np.ndarray:
        calls.append(len(items))
        raise RuntimeError("CUDA error: device-side assert triggered")

    outcomes = run_callers(
        scheduler, [lambda v=v: scheduler.batched("k", forward, np.array([v])) for v in (1.0, 2.0)]
    )
    assert calls == [2]
    assert [type(error) for _, error in outcomes] == [DeviceBrokenError, DeviceBrokenError]
    assert len(handed_on) == 1
    scheduler.stop()


def test_an_error_that_leaves_the_device_usable_fails_only_its_call() -> None:
    handed_on: list[BaseException] = []
    scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0, on_broken_device=handed_on.append)

    def invalid_argument() -> None:
        raise torch.AcceleratorError("CUDA error: invalid argument")

    with pytest.raises(torch.AcceleratorError):
        scheduler.call(invalid_argument)
    assert scheduler.call(lambda: "next") == "next" and handed_on == []
    scheduler.stop()


# -- admission ---------------------------------------------------------------------------------
def test_requests_over_the_pixel_budget_wait_in_arrival_order() -> None:
    budget = PixelBudget(limit=100)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with budget.hold(80):
            order.append("first in")
            first_in.set()
            release_first.wait(HANG_S)
        order.append("first out")

    def later(name: str, pixels: int, queued: threading.Event) -> None:
        queued.set()
        with budget.hold(pixels):
            order.append(f"{name} in")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert first_in.wait(HANG_S)
    big_queued, small_queued = threading.Event(), threading.Event()
    # the big one (over the budget alongside the first) arrives before a small one that would fit
    threads.append(threading.Thread(target=later, args=("big", 90, big_queued)))
    threads[-1].start()
    big_queued.wait(HANG_S)
    while len(budget._waiting) < 1:
        threading.Event().wait(0.01)
    threads.append(threading.Thread(target=later, args=("small", 10, small_queued)))
    threads[-1].start()
    while len(budget._waiting) < 2:
        threading.Event().wait(0.01)
    assert order == ["first in"]  # the small one does not overtake the big one
    release_first.set()
    for thread in threads:
        thread.join(HANG_S)
    assert order == ["first in", "first out", "big in", "small in"]
    assert budget.in_flight == 0


def test_a_request_alone_is_admitted_whatever_its_size() -> None:
    budget = PixelBudget(limit=10)
    with budget.hold(1000) as waited_ms:
        assert budget.in_flight == 1000
        assert waited_ms >= 0
    assert budget.in_flight == 0


def test_a_request_cancelled_while_it_waits_for_admission_leaves_without_pixels() -> None:
    budget = PixelBudget(limit=100)
    cancel = threading.Event()
    outcome: list[str] = []

    def waiting() -> None:
        try:
            with budget.hold(50, cancel):
                outcome.append("admitted")
        except RequestCancelled:
            outcome.append("cancelled")

    with budget.hold(80):
        thread = threading.Thread(target=waiting)
        thread.start()
        while not budget._waiting:
            threading.Event().wait(0.01)
        cancel.set()
        thread.join(HANG_S)
        assert outcome == ["cancelled"]
        assert budget.in_flight == 80 and not budget._waiting
    assert budget.in_flight == 0


def test_a_held_device_makes_callers_arriving_apart_share_a_forward_and_each_counts_it() -> None:
    # the test's gate holds the device thread until both requests are in progress: without
    # it the first caller's faces would run alone, before the second caller exists
    scheduler = DeviceScheduler(batch_size=2, batch_wait_s=HANG_S)
    hold_device_until(scheduler, 2)
    device = Recorder()
    second_may_start = threading.Event()
    shared: dict[float, int] = {}

    def request(value: float) -> None:
        with scheduler.caller():
            second_may_start.set()
            scheduler.call(device, np.array([0.0]))  # an unbatchable call before the faces
            scheduler.batched("k", device, np.array([value]))
            shared[value] = scheduler.shared_forwards()

    first = threading.Thread(target=request, args=(1.0,))
    first.start()
    second_may_start.wait(HANG_S)  # the first is in progress before the second starts
    second = threading.Thread(target=request, args=(2.0,))
    second.start()
    for thread in (first, second):
        thread.join(HANG_S)
        assert not thread.is_alive(), "a caller hung"
    assert [1.0, 2.0] in device.batches or [2.0, 1.0] in device.batches
    assert shared == {1.0: 1, 2.0: 1}
    # the gate opened: a lone caller afterwards neither waits for anyone nor shares
    [(status, _)] = run_callers(scheduler, [lambda: scheduler.batched("k", device, np.array([3.0]))])
    assert status == "ok" and device.batches[-1] == [3.0]
    assert scheduler.shared_forwards() == 0  # counted per caller thread
    scheduler.stop()


def test_without_a_gate_nothing_counts_as_shared_for_a_lone_caller() -> None:
    scheduler = DeviceScheduler(batch_size=2, batch_wait_s=0.0)
    device = Recorder()
    counts: list[int] = []

    def lone() -> None:
        scheduler.batched("k", device, np.array([1.0]))
        counts.append(scheduler.shared_forwards())

    run_callers(scheduler, [lone])
    assert counts == [0] and device.batches == [[1.0]]
    scheduler.stop()


def _in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _joined(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(HANG_S)
        assert not thread.is_alive(), "a caller hung"


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.001)


def test_the_device_runs_ready_calls_while_a_batch_waits_for_faces() -> None:
    """A waits in a part-filled batch for B's faces; B's other calls (a detection, a batch of
    another key) run meanwhile, then B's faces join A's forward. With a wait of an hour, B's
    calls finishing at all shows the device did not sit out the wait."""
    scheduler = DeviceScheduler(batch_size=2, batch_wait_s=3600.0)
    device = Recorder()
    a_queued, b_ran_meanwhile = threading.Event(), threading.Event()
    order: list[str] = []

    def request_a() -> None:
        with scheduler.caller():
            b_inside.wait(HANG_S)
            a_queued.set()
            scheduler.batched(("restore", 1), device, np.array([1.0]))
            order.append("a restored")

    def request_b() -> None:
        with scheduler.caller():
            b_inside.set()
            a_queued.wait(HANG_S)
            _wait_until(lambda: len(scheduler._queue) == 1)  # A's faces wait in the queue
            scheduler.call(lambda: order.append("b detect"))  # unbatchable, queued behind A's batch
            scheduler.batched(("parse", 1), device, np.array([7.0]))  # another stage's batch
            b_ran_meanwhile.set()
            scheduler.batched(("restore", 1), device, np.array([2.0]))

    b_inside = threading.Event()
    threads = [_in_thread(request_a), _in_thread(request_b)]
    _joined(*threads)
    assert b_ran_meanwhile.is_set()
    assert order[0] == "b detect" and "a restored" in order
    assert sorted(device.batches[-1]) == [1.0, 2.0]  # A's faces waited and shared with B's
    assert [7.0] in device.batches
    scheduler.stop()


def test_a_batch_does_not_wait_for_requests_past_its_stage() -> None:
    """B has passed the restore stage (it is pasting back): A's part-filled restore batch runs
    at once instead of waiting an hour for faces B will never bring; a batch of the parse
    stage would still wait for B."""
    scheduler = DeviceScheduler(batch_size=4, batch_wait_s=3600.0)
    device = Recorder()
    b_past_restore, a_done = threading.Event(), threading.Event()

    def request_a() -> None:
        with scheduler.caller():
            b_past_restore.wait(HANG_S)
            scheduler.batched(("restore", 1), device, np.array([1.0]))
            a_done.set()

    def request_b() -> None:
        with scheduler.caller():
            scheduler.finished("restore")
            b_past_restore.set()
            a_done.wait(HANG_S)  # B stays in progress until A's batch has run

    _joined(_in_thread(request_a), _in_thread(request_b))
    assert a_done.is_set() and device.batches == [[1.0]]
    scheduler.stop()


def test_a_batch_waits_at_most_its_wait_from_its_first_call() -> None:
    """B never brings faces and stays in progress: A's batch runs once the wait has passed."""
    scheduler = DeviceScheduler(batch_size=4, batch_wait_s=0.05)
    device = Recorder()
    a_done = threading.Event()

    def request_a() -> None:
        with scheduler.caller():
            scheduler.batched(("restore", 1), device, np.array([1.0]))
            a_done.set()

    def request_b() -> None:
        with scheduler.caller():
            a_done.wait(HANG_S)

    _joined(_in_thread(request_b), _in_thread(request_a))
    assert a_done.is_set() and device.batches == [[1.0]]
    scheduler.stop()


def test_the_device_thread_goes_on_while_a_request_waits_for_its_copies() -> None:
    """A call's results on their way to the host are waited for by its request, on its thread:
    the next request's calls run meanwhile, and each caller of a batch gets its own rows."""
    scheduler = DeviceScheduler(batch_size=2, batch_wait_s=3600.0)
    event = GatedEvent()
    rows = torch.arange(6.0).reshape(3, 2)
    got: dict[str, Any] = {}
    both_in = threading.Barrier(2)

    def forward(items: np.ndarray) -> tuple[Download, None]:  # a batch's rows in one copy, no flags
        return Download(rows[: len(items)], event), None

    def request(name: str, items: np.ndarray) -> None:
        threading.current_thread().name = name
        with scheduler.caller():
            both_in.wait(HANG_S)
            got[name] = scheduler.batched("restore", forward, items)
            got[f"{name} later"] = scheduler.call(lambda: "ran")

    threads = [_in_thread(lambda: request("a", np.zeros(1))), _in_thread(lambda: request("b", np.zeros(1)))]
    _wait_until(lambda: len(event.waited_on) == 2)  # both wait for the one copy of their batch
    assert scheduler.call(lambda: "another request's call") == "another request's call"
    assert "a" not in got and "b" not in got, "the rows were handed over before their copy ran"
    event.gate.set()
    _joined(*threads)
    assert sorted(event.waited_on) == ["a", "b"], "waited for on the requests' threads only"
    assert sorted(got["a"][0].tolist() + got["b"][0].tolist()) == rows[:2].tolist(), "a row each"
    assert got["a"][1] is None and got["a later"] == got["b later"] == "ran"
    scheduler.stop()
