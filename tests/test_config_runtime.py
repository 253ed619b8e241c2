"""Request option validation, settings from the environment, and the optimized-runtime backend lock."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from codeformer.config import PROFILES, STABILITY_MODES, RequestOptions, Settings
from codeformer.errors import ConfigError, InputError
from codeformer.runtime import Nets, Runtime, mixed_precision_pays


def test_defaults_are_the_official_recipe() -> None:
    options = RequestOptions.parse()
    assert options == RequestOptions()  # one set of defaults, whichever way the options are made
    assert options.fidelity == 0.5
    assert options.profile == PROFILES["baseline"]
    assert not options.profile.mixed_precision and options.profile.use_parse
    assert options.stability == STABILITY_MODES["safe"] and not options.stability.compiled
    # optimized alone means channels_last without compiling: the fastest measured on CPU
    assert options.compile_backend == "none"


@pytest.mark.parametrize("fidelity", [0.0, 0.5, 1.0, "0.25"])
def test_fidelity_in_range_is_accepted(fidelity: float | str) -> None:
    assert RequestOptions.parse(fidelity=fidelity).fidelity == float(fidelity)


@pytest.mark.parametrize("fidelity", [-0.1, 1.1, 1.5, float("nan"), "abc", None])
def test_fidelity_out_of_range_is_refused(fidelity: object) -> None:
    with pytest.raises(InputError, match="codeformer_fidelity"):
        RequestOptions.parse(fidelity=fidelity)


@pytest.mark.parametrize("fidelity", [-0.1, 1.5, float("nan")])
def test_options_built_directly_refuse_fidelity_out_of_range(fidelity: float) -> None:
    """Checked when built, however built: the restorer takes ``options.fidelity`` as it is."""
    with pytest.raises(InputError, match="codeformer_fidelity"):
        RequestOptions(fidelity=fidelity)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("runtime_profile", {"profile": "turbo"}),
        ("stability_mode", {"stability": "reckless"}),
        ("compile_backend", {"compile_backend": "tensorrt"}),
    ],
)
def test_unknown_names_are_refused_with_the_choices(field: str, kwargs: dict) -> None:
    with pytest.raises(InputError, match=rf"{field} must be one of .*got '"):
        RequestOptions.parse(**kwargs)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEFORMER_MAX_FACES", "3")
    monkeypatch.setenv("CODEFORMER_MAX_PIXELS", "")  # empty counts as unset
    monkeypatch.setenv("CODEFORMER_WEIGHTS_DIR", "~/w")
    monkeypatch.setenv("CODEFORMER_DOWNLOAD_BACKOFF", "0")
    monkeypatch.delenv("CODEFORMER_FACE_BATCH", raising=False)
    settings = Settings.from_env()
    assert settings.max_faces == 3 and settings.max_pixels == 40_000_000
    assert settings.weights_dir == Path("~/w").expanduser() and settings.download_backoff_s == 0.0
    assert (settings.face_batch, Settings.from_env("cuda").face_batch) == (1, 4)
    monkeypatch.setenv("CODEFORMER_MAX_FACES", "zero")
    with pytest.raises(ConfigError, match="CODEFORMER_MAX_FACES must be a positive integer, got 'zero'"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("name", "raw", "allowed"),
    [
        ("CODEFORMER_FETCH_TIMEOUT_S", "0", "an integer from 1 to 3600"),
        ("CODEFORMER_DOWNLOAD_TIMEOUT", "soon", "a number >= 0.001"),
        ("CODEFORMER_DOWNLOAD_BACKOFF", "-1", "a number >= 0"),
        ("CODEFORMER_DOWNLOAD_ATTEMPTS", "0", "a positive integer"),
        ("CODEFORMER_MIXED_PRECISION", "bf16", "one of auto, on, off"),
        ("CODEFORMER_COMPILE_BACKEND", "tensorrt", "one of none, eager, aot_eager, inductor, cudagraphs"),
    ],
)
def test_a_bad_variable_is_one_error_naming_it_and_what_it_accepts(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, allowed: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError, match=f"^{name} must be {allowed}, got '{raw}'"):
        Settings.from_env()


def test_readme_documents_every_variable_the_settings_read() -> None:
    project = Path(__file__).resolve().parents[1]
    read = set(re.findall(r'"(CODEFORMER_[A-Z_]+)"', (project / "codeformer" / "config.py").read_text()))
    documented = set(re.findall(r"^\| `(CODEFORMER_[A-Z_]+)` \|", (project / "README.md").read_text(), re.M))
    assert read == documented


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 2047), ("0", 0), ("512", 512), ("2048", None), ("-1", None)]
)
def test_retained_memory_from_environment(monkeypatch: pytest.MonkeyPatch, raw: str | None, expected) -> None:
    monkeypatch.delenv("CODEFORMER_MAX_FACES", raising=False)
    if raw is None:
        monkeypatch.delenv("CODEFORMER_RETAINED_MEMORY_MB", raising=False)
    else:
        monkeypatch.setenv("CODEFORMER_RETAINED_MEMORY_MB", raw)
    if expected is None:
        with pytest.raises(
            ConfigError, match="CODEFORMER_RETAINED_MEMORY_MB must be an integer from 0 to 2047"
        ):
            Settings.from_env()
    else:
        assert Settings.from_env().retained_memory_mb == expected


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


def test_a_cuda_only_compile_backend_setting_fails_set_up_on_a_cpu() -> None:
    with pytest.raises(ConfigError, match="CODEFORMER_COMPILE_BACKEND=cudagraphs needs a CUDA GPU"):
        Runtime(_tiny_nets(), torch.device("cpu"), compile_backend="cudagraphs")


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
