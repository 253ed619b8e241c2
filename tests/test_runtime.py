"""``codeformer.runtime``: the nets each request gets (safe, optimized, compiled), mixed
precision and its measured decision, and the compile backend setting."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import torch
from helpers import GatedEvent
from torch import nn

from codeformer import pipeline
from codeformer.config import STABILITY_MODES, RequestOptions, Settings
from codeformer.errors import ConfigError
from codeformer.pipeline import Restorer
from codeformer.runtime import (
    Download,
    Nets,
    Runtime,
    arrived,
    compile_options,
    cuda_numerics,
    downloads,
    mixed_precision_pays,
    staged,
)


def _tiny_nets() -> Nets:
    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()

    return Nets(conv(), conv(), conv())


def test_safe_requests_get_the_nets_as_loaded() -> None:
    nets = _tiny_nets()
    runtime = Runtime(nets, torch.device("cpu"))
    assert runtime.nets_for(STABILITY_MODES["safe"], "inductor") is nets
    assert runtime.compile_backend is None  # safe requests never initialise the optimized runtime


def test_optimized_nets_are_channels_last_copies_and_the_backend_is_locked() -> None:
    nets = _tiny_nets()
    runtime = Runtime(nets, torch.device("cpu"))
    optimized = runtime.nets_for(STABILITY_MODES["optimized"], "none")
    assert runtime.compile_backend == "none"
    weight = optimized.codeformer[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert nets.codeformer[0].weight.is_contiguous()  # the safe nets keep their format
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(optimized.codeformer(x), nets.codeformer(x))
    assert runtime.nets_for(STABILITY_MODES["optimized"], "none") is optimized
    with pytest.raises(ConfigError, match="compile_backend is fixed to 'none'.*got 'eager'"):
        runtime.nets_for(STABILITY_MODES["optimized"], "eager")
    assert runtime.nets_for(STABILITY_MODES["safe"], "eager") is nets  # safe ignores the backend


def test_compiled_backend_runs_and_matches_eager() -> None:
    nets = _tiny_nets()
    runtime = Runtime(nets, torch.device("cpu"))
    optimized = runtime.nets_for(STABILITY_MODES["optimized"], "eager")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(optimized.parsenet(x), nets.parsenet(x))


def test_cuda_only_backend_is_refused_on_cpu() -> None:
    runtime = Runtime(_tiny_nets(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="cudagraphs.*needs a CUDA GPU"):
        runtime.nets_for(STABILITY_MODES["optimized"], "cudagraphs")
    assert runtime.compile_backend is None  # a refused request initialises nothing


def test_mixed_precision_variant_stores_convolutions_in_the_autocast_dtype() -> None:
    nets = _tiny_nets()
    runtime = Runtime(nets, torch.device("cpu"))
    full = runtime.nets_for(STABILITY_MODES["optimized"], "none", mixed_precision=False)
    mixed = runtime.nets_for(STABILITY_MODES["optimized"], "none", mixed_precision=True)
    assert mixed is not full and runtime.compile_backend == "none"
    assert mixed.codeformer[0].weight.dtype == torch.bfloat16
    assert full.codeformer[0].weight.dtype == torch.float32
    assert nets.codeformer[0].weight.dtype == torch.float32  # the safe nets are untouched
    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # autocast would cast the float32 weights to bfloat16 on every call: same numbers
        torch.testing.assert_close(mixed.codeformer(x), nets.codeformer(x), rtol=0, atol=0)


def _timer(float32_s: float, reduced_s: float):
    measured: list[torch.dtype] = []

    def time_convolution(dtype: torch.dtype) -> float:
        measured.append(dtype)
        return float32_s if dtype == torch.float32 else reduced_s

    return time_convolution, measured


@pytest.mark.parametrize(
    ("float32_s", "bf16_s", "expected"),
    [(0.020, 0.010, True), (0.020, 0.030, False), (0.020, 0.019, False), (0.023, 0.020, True)],
)
def test_auto_mixed_precision_on_a_cpu_follows_the_measured_convolutions(
    float32_s: float, bf16_s: float, expected: bool
) -> None:
    timer, measured = _timer(float32_s, bf16_s)
    assert mixed_precision_pays(torch.device("cpu"), "auto", timer, has_bf16_kernels=lambda: True) is expected
    assert sorted(measured, key=str) == [torch.bfloat16, torch.float32]


def test_auto_mixed_precision_on_a_cpu_without_bf16_kernels_is_off_without_measuring() -> None:
    timer, measured = _timer(0.020, 0.001)  # even a bf16 figure that would pay is not asked for
    assert mixed_precision_pays(torch.device("cpu"), "auto", timer, has_bf16_kernels=lambda: False) is False
    assert measured == []


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("on", "cpu", True), ("off", "cpu", False), ("off", "cuda", False), ("auto", "cuda", True)],
)
def test_explicit_settings_and_cuda_decide_without_measuring(
    setting: str, device: str, expected: bool
) -> None:
    timer, measured = _timer(0.010, 0.020)
    assert mixed_precision_pays(torch.device(device), setting, timer) is expected
    assert measured == []


def test_the_calibration_reports_its_fastest_run_after_a_first_untimed_one() -> None:
    from codeformer.runtime import _time_convolution

    # start/stop readings of four runs: 9 s (the first, which builds the primitive), then 5, 2, 4
    readings = iter([0.0, 9.0, 10.0, 15.0, 20.0, 22.0, 30.0, 34.0])
    assert _time_convolution(torch.float32, repeats=3, clock=lambda: next(readings)) == 2.0
    assert next(readings, None) is None  # exactly repeats + 1 runs were timed


def test_mixed_precision_setting_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODEFORMER_MIXED_PRECISION", raising=False)
    assert Settings.from_env().mixed_precision == "auto"
    monkeypatch.setenv("CODEFORMER_MIXED_PRECISION", "off")
    settings = Settings.from_env()
    assert settings.mixed_precision == "off"
    assert Runtime(_tiny_nets(), torch.device("cpu"), settings.mixed_precision).mixed_precision is False
    monkeypatch.setenv("CODEFORMER_MIXED_PRECISION", "bf16")
    with pytest.raises(
        ConfigError, match="CODEFORMER_MIXED_PRECISION must be one of auto, on, off, got 'bf16'"
    ):
        Settings.from_env()


def test_compile_backend_setting_fixes_the_backend_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CODEFORMER_COMPILE_BACKEND", raising=False)
    assert Settings.from_env().compile_backend == ""  # unset: the first optimized request picks
    monkeypatch.setenv("CODEFORMER_COMPILE_BACKEND", "eager")
    backend = Settings.from_env().compile_backend
    runtime = Runtime(_tiny_nets(), torch.device("cpu"), compile_backend=backend)
    assert runtime.compile_backend == "eager"  # before any request
    with pytest.raises(ConfigError, match="fixed to 'eager' by CODEFORMER_COMPILE_BACKEND; got 'none'"):
        runtime.check_backend("none")
    runtime.check_backend("eager")


@pytest.mark.parametrize("backend", ["cudagraphs", "inductor-cudagraphs"])
def test_a_cuda_only_compile_backend_setting_fails_set_up_on_a_cpu(backend: str) -> None:
    with pytest.raises(ConfigError, match=f"CODEFORMER_COMPILE_BACKEND={backend} needs a CUDA GPU"):
        Runtime(_tiny_nets(), torch.device("cpu"), compile_backend=backend)


def test_inductor_cudagraphs_compiles_with_inductor_in_a_mode_that_replays_cuda_graphs() -> None:
    options = compile_options("inductor-cudagraphs")
    assert (options["backend"], options["dynamic"]) == ("inductor", False)
    # what the mode means in the torch this runs with: Inductor's CUDA graphs on
    assert torch._inductor.list_mode_options()[options["mode"]]["triton.cudagraphs"] is True
    assert compile_options("eager") == {"backend": "eager", "dynamic": False}


def test_a_device_thread_gets_cudagraph_trees_of_its_own() -> None:
    """torch before 2.14 kept them only in the importing thread: the cudagraphs backend then
    failed on the scheduler's thread (seen on a GPU with torch 2.11)."""
    import threading

    from torch._inductor import cudagraph_trees

    from codeformer.runtime import give_this_thread_cudagraph_trees

    seen: dict[str, object] = {}

    def device_thread() -> None:
        seen["had_trees"] = hasattr(cudagraph_trees.local, "tree_manager_containers")
        give_this_thread_cudagraph_trees()
        seen["containers"] = cudagraph_trees.local.tree_manager_containers
        seen["container"] = cudagraph_trees.get_container(0)

    thread = threading.Thread(target=device_thread)
    thread.start()
    thread.join()
    assert seen["had_trees"] is False  # a new thread starts without them
    assert seen["containers"] == {0: seen["container"]}  # the thread's own, used by torch


# -- CUDA numerics per call ----------------------------------------------------------------
def _cuda_flags() -> tuple[bool, bool, bool]:
    return (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


@pytest.mark.parametrize("fast_math", [True, False])
def test_cuda_calls_get_tf32_and_autotuning_only_for_fast_profiles(fast_math: bool) -> None:
    # the flags can be set without a GPU; what a CUDA call would run under is what they say
    with cuda_numerics(torch.device("cuda", 0), fast_math):
        assert _cuda_flags() == (fast_math,) * 3
    assert _cuda_flags() == (False,) * 3  # back to the official numerics after the call


def test_cuda_numerics_leave_other_devices_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with cuda_numerics(torch.device("cpu"), fast_math=False):
        assert torch.backends.cudnn.benchmark is True


def test_each_profiles_device_calls_run_under_its_numerics(
    faceless_weights_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """baseline's device calls ask for exact numerics, fast's and max_speed's for fast math."""
    asked: list[bool] = []

    @contextlib.contextmanager
    def recorded(device: torch.device, fast_math: bool):
        asked.append(fast_math)
        yield

    restorer = Restorer.load(faceless_weights_dir, "cpu", Settings.from_env())
    monkeypatch.setattr(pipeline, "cuda_numerics", recorded)
    image = np.full((64, 96, 3), 90, np.uint8)
    for profile, fast_math in (("baseline", False), ("fast", True), ("max_speed", True)):
        asked.clear()
        restorer.restore([image], RequestOptions.parse(0.5, profile, "safe", "none"))
        assert asked and set(asked) == {fast_math}, (profile, asked)


def test_a_download_and_its_rows_arrive_once_its_event_has_passed() -> None:
    host = torch.arange(12).reshape(4, 3)
    event = GatedEvent()
    download = Download(host, event)
    rows = download[1:3]  # taken before the copy has run: a view under the same event
    assert len(rows) == 2 and event.waited_on == []
    waiter = threading.Thread(target=lambda: arrived((rows, None)), name="request")
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "the rows are not there before the event"
    event.gate.set()
    waiter.join(10)
    assert event.waited_on == ["request"]
    first, nothing = arrived((rows, None))
    assert torch.equal(first, host[1:3]) and nothing is None


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float64])  # faces, labels, masks
def test_downloads_of_host_tensors_are_the_tensors_without_an_event(dtype: torch.dtype) -> None:
    # on CUDA they go to pinned memory behind one event (tests/test_fake_cuda.py)
    result = (torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 200).to(dtype)
    flags = torch.tensor([True, False, True])
    host_result, host_flags = arrived(downloads(result[:, 1:], flags))  # a non-contiguous result too
    assert host_result.dtype == dtype and torch.equal(host_result, result[:, 1:])
    assert host_flags.tolist() == [True, False, True]


def test_staged_parts_off_cuda_are_the_host_join_and_a_lone_part_is_not_copied() -> None:
    # on CUDA the join goes into pinned memory (tests/test_fake_cuda.py); elsewhere it stays NumPy
    parts = [np.full((count, 2, 3), count, np.uint8) for count in (2, 1, 3)]
    joined = staged(parts, torch.device("cpu"))
    assert isinstance(joined, np.ndarray) and np.array_equal(joined, np.concatenate(parts))
    assert staged(parts[:1], torch.device("cpu")) is parts[0]
