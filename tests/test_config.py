"""``codeformer.config``: request option validation and the settings read from the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from codeformer.config import PROFILES, STABILITY_MODES, RequestOptions, Settings
from codeformer.errors import ConfigError, InputError


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
        (
            "CODEFORMER_COMPILE_BACKEND",
            "tensorrt",
            "one of none, eager, aot_eager, inductor, cudagraphs, inductor-cudagraphs",
        ),
    ],
)
def test_a_bad_variable_is_one_error_naming_it_and_what_it_accepts(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, allowed: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError, match=f"^{name} must be {allowed}, got '{raw}'"):
        Settings.from_env()


def test_the_docs_document_every_variable_the_settings_read() -> None:
    project = Path(__file__).resolve().parents[1]
    sources = "\n".join(path.read_text() for path in (project / "codeformer").rglob("*.py"))
    read = set(re.findall(r'"(CODEFORMER_[A-Z_]+)"', sources))
    table = (project / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(CODEFORMER_[A-Z_]+)` \|", table, re.M))
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
