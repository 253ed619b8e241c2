"""Named, frozen settings: what a request may choose, and how the process is configured.

``RequestOptions`` holds a request's four options, parsed once (``RequestOptions.parse``)
and passed through to the pipeline. ``Settings`` holds every ``CODEFORMER_*`` environment
variable, read once at start (``Settings.from_env``). Profiles and stability modes are
data, not code paths: the pipeline reads these fields and ``codeformer.runtime`` is the
one place that turns them into torch settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from codeformer.errors import ConfigError, InputError

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
FACE_SIZE = 512  # the aligned crop is FACE_SIZE x FACE_SIZE; CodeFormer's latent grid is hard-wired to it


@dataclass(frozen=True)
class Profile:
    """How much numeric fidelity to trade for speed."""

    name: str
    mixed_precision: bool  # fp16 autocast on CUDA, bf16 on CPU
    # ParseNet mask in paste-back (docs/reference.md §6.3 step 9) or the plain soft mask (§6.4)
    use_parse: bool


@dataclass(frozen=True)
class Stability:
    """Whether to run the nets as written (safe) or compiled in channels_last (optimized)."""

    name: str
    compiled: bool
    channels_last: bool


PROFILES: dict[str, Profile] = {
    "baseline": Profile("baseline", mixed_precision=False, use_parse=True),
    "fast": Profile("fast", mixed_precision=True, use_parse=True),
    "max_speed": Profile("max_speed", mixed_precision=True, use_parse=False),
}
STABILITY_MODES: dict[str, Stability] = {
    "safe": Stability("safe", compiled=False, channels_last=False),
    "optimized": Stability("optimized", compiled=True, channels_last=True),
}
# "none" runs the channels_last nets without torch.compile; "inductor-cudagraphs" is Inductor's
# kernels replayed as CUDA graphs (runtime.compile_options). The seed's choices come first.
COMPILE_BACKENDS = ("none", "eager", "aot_eager", "inductor", "cudagraphs", "inductor-cudagraphs")
# the backends that record each graph once and replay it: they need CUDA
GRAPH_REPLAYING_BACKENDS = frozenset({"cudagraphs", "inductor-cudagraphs"})
CUDA_ONLY_BACKENDS = GRAPH_REPLAYING_BACKENDS


# The one default of each request option: predict.py's inputs (and so the served schema),
# the CLI and the library all take these. compile_backend "none" (channels_last, nothing
# compiled) was the fastest on CPU (README's Benchmarks) and has no compile wait, so
# "optimized" alone is fast.
DEFAULT_FIDELITY = 0.5
DEFAULT_PROFILE = "baseline"
DEFAULT_STABILITY = "safe"
DEFAULT_COMPILE_BACKEND = "none"


@dataclass(frozen=True)
class RequestOptions:
    """The per-request choices, validated: parsed once per request, then passed through.

    The fidelity's range is checked when built, however built (``parse`` or the
    constructor), so that the stages take ``fidelity`` as it is.
    """

    fidelity: float = DEFAULT_FIDELITY
    profile: Profile = PROFILES[DEFAULT_PROFILE]
    stability: Stability = STABILITY_MODES[DEFAULT_STABILITY]
    compile_backend: str = DEFAULT_COMPILE_BACKEND

    def __post_init__(self) -> None:
        if not 0.0 <= self.fidelity <= 1.0:  # also rejects NaN
            raise InputError(f"codeformer_fidelity must be between 0 and 1, got {self.fidelity}")

    @classmethod
    def parse(
        cls,
        fidelity: float = DEFAULT_FIDELITY,
        profile: str = DEFAULT_PROFILE,
        stability: str = DEFAULT_STABILITY,
        compile_backend: str = DEFAULT_COMPILE_BACKEND,
    ) -> RequestOptions:
        """Validate user-facing names and values; raises ``InputError`` naming the input."""
        try:
            fidelity = float(fidelity)
        except (TypeError, ValueError):
            raise InputError(
                f"codeformer_fidelity must be a number between 0 and 1, got {fidelity!r}"
            ) from None
        if profile not in PROFILES:
            raise InputError(f"runtime_profile must be one of {', '.join(PROFILES)}; got {profile!r}")
        if stability not in STABILITY_MODES:
            raise InputError(f"stability_mode must be one of {', '.join(STABILITY_MODES)}; got {stability!r}")
        if compile_backend not in COMPILE_BACKENDS:
            raise InputError(
                f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}; got {compile_backend!r}"
            )
        return cls(fidelity, PROFILES[profile], STABILITY_MODES[stability], compile_backend)


# -- process settings: the CODEFORMER_* environment variables ------------------------------
MIXED_PRECISION_CHOICES = ("auto", "on", "off")
PIXEL_STAGES_CHOICES = ("auto", "host", "device")

BOOLEANS = {"0": False, "1": True}
# glibc takes the trim threshold as a C int: 2 GiB - 1 byte is the most it can hold
MAX_RETAINED_MEMORY_MB = 2047
# On a GPU, batching faces fills the device; on a CPU the convolutions are already
# parallel inside one face, so batches of two were no faster than batches of one (CodeFormer
# and ParseNet, README's Benchmarks), and a batch of one holds half the activations.
DEFAULT_FACE_BATCH = {"cuda": 4, "cpu": 1}


@dataclass(frozen=True)
class Settings:
    """Everything a process is configured with, fixed at start; ``from_env`` reads it.

    Each field is one ``CODEFORMER_*`` variable, named in its comment without the prefix
    (README's "Configuration" table documents them); its default is what an unset variable means.
    """

    max_pixels: int = 40_000_000  # MAX_PIXELS: decoded images above this are refused from the header
    max_faces: int = 20  # MAX_FACES: per image; the highest-scoring faces are kept
    face_batch: int = DEFAULT_FACE_BATCH["cpu"]  # FACE_BATCH: faces per CodeFormer/ParseNet forward
    # MAX_PIXELS_IN_FLIGHT: concurrent requests wait while their images' pixels would pass this
    # (codeformer.scheduler.PixelBudget); the default admits one request of four images at the limit
    max_pixels_in_flight: int = 4 * 40_000_000
    # BATCH_WAIT_MS: how long a part-filled face batch waits for faces of other requests in flight
    batch_wait_ms: float = 5.0
    # RETAINED_MEMORY_MB: freed host memory kept for reuse (codeformer.host_memory; CPU only)
    retained_memory_mb: int = MAX_RETAINED_MEMORY_MB
    fetch_timeout_s: float = 60.0  # FETCH_TIMEOUT_S: one deadline for all of a request's URL inputs
    # ALLOW_PRIVATE_URLS: 1 also fetches URLs whose host is not a public address (loopback,
    # private, link-local, ...: codeformer.serving.fetch); for local development and the tests
    allow_private_urls: bool = False
    mixed_precision: str = "auto"  # MIXED_PRECISION: auto, on or off (codeformer.runtime)
    # PIXEL_STAGES: where fast's and max_speed's pixel stages run: auto (the nets' device on
    # CUDA, the host on a CPU), host, or device (the nets' device, a CPU included); baseline's
    # always run on the host (codeformer.pipeline.pixels_on_device)
    pixel_stages: str = "auto"
    # COMPILE_BACKEND: one of COMPILE_BACKENDS, or empty: the backend every optimized request
    # runs, compiled and warmed at set-up (Restorer.prepare_optimized); empty: the first
    # optimized request picks it and pays its compile
    compile_backend: str = ""
    # COMPILE_CACHE: a file of torch's compile artifacts (runtime.load_compile_cache): set-up
    # loads it before compiling, and writes it after compiling where it was missing; empty: none
    compile_cache: Path | None = None
    weights_dir: Path = PROJECT_ROOT / "weights"  # WEIGHTS_DIR: where the weight files live
    weights_url: str = ""  # WEIGHTS_URL: a mirror's base URL; empty: the official release URLs
    download_timeout_s: float = 30.0  # DOWNLOAD_TIMEOUT: for the connect and for each read
    download_attempts: int = 4  # DOWNLOAD_ATTEMPTS
    download_backoff_s: float = 1.0  # DOWNLOAD_BACKOFF: before the 2nd attempt; doubles after each
    # REQUIRE_GPU: 1 in the GPU image (cog.yaml): set-up fails, saying why, without usable CUDA
    require_gpu: bool = False

    @classmethod
    def from_env(cls, device_type: str = "cpu", **overrides: Any) -> Settings:
        """The settings from the environment; an unset or empty variable keeps the default above.

        ``overrides`` fix some fields whatever the environment says (tests, benchmarks).
        """
        settings = cls(
            max_pixels=_env_int("CODEFORMER_MAX_PIXELS", cls.max_pixels),
            max_faces=_env_int("CODEFORMER_MAX_FACES", cls.max_faces),
            face_batch=_env_int("CODEFORMER_FACE_BATCH", DEFAULT_FACE_BATCH.get(device_type, 1)),
            max_pixels_in_flight=_env_int("CODEFORMER_MAX_PIXELS_IN_FLIGHT", cls.max_pixels_in_flight),
            batch_wait_ms=_env_number("CODEFORMER_BATCH_WAIT_MS", cls.batch_wait_ms, 0.0),
            retained_memory_mb=_env_int(
                "CODEFORMER_RETAINED_MEMORY_MB", cls.retained_memory_mb, 0, MAX_RETAINED_MEMORY_MB
            ),
            fetch_timeout_s=_env_int("CODEFORMER_FETCH_TIMEOUT_S", int(cls.fetch_timeout_s), 1, 3600),
            allow_private_urls=_env(
                "CODEFORMER_ALLOW_PRIVATE_URLS", cls.allow_private_urls, BOOLEANS.get, "0 or 1"
            ),
            mixed_precision=_env(
                "CODEFORMER_MIXED_PRECISION",
                cls.mixed_precision,
                lambda raw: raw if raw in MIXED_PRECISION_CHOICES else None,
                f"one of {', '.join(MIXED_PRECISION_CHOICES)}",
            ),
            pixel_stages=_env(
                "CODEFORMER_PIXEL_STAGES",
                cls.pixel_stages,
                lambda raw: raw if raw in PIXEL_STAGES_CHOICES else None,
                f"one of {', '.join(PIXEL_STAGES_CHOICES)}",
            ),
            compile_backend=_env(
                "CODEFORMER_COMPILE_BACKEND",
                cls.compile_backend,
                lambda raw: raw if raw in COMPILE_BACKENDS else None,
                f"one of {', '.join(COMPILE_BACKENDS)}",
            ),
            compile_cache=_env("CODEFORMER_COMPILE_CACHE", cls.compile_cache, _path),
            weights_dir=_env("CODEFORMER_WEIGHTS_DIR", cls.weights_dir, _path),
            weights_url=_env("CODEFORMER_WEIGHTS_URL", cls.weights_url, str),
            download_timeout_s=_env_number("CODEFORMER_DOWNLOAD_TIMEOUT", cls.download_timeout_s, 0.001),
            download_attempts=_env_int("CODEFORMER_DOWNLOAD_ATTEMPTS", cls.download_attempts),
            download_backoff_s=_env_number("CODEFORMER_DOWNLOAD_BACKOFF", cls.download_backoff_s, 0.0),
            require_gpu=_env("CODEFORMER_REQUIRE_GPU", cls.require_gpu, BOOLEANS.get, "0 or 1"),
        )
        return dataclasses.replace(settings, **overrides)


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _env(name: str, default: T, parse: Callable[[str], T | None], allowed: str = "") -> T:
    """``parse`` of variable ``name``, or ``default`` when it is unset or empty.

    ``parse`` returns None (or raises ValueError) for a value outside ``allowed``: the
    ConfigError then names the variable, the value, what it accepts and the default.
    """
    raw = os.environ.get(name, "")
    if raw == "":  # `NAME= command` in a shell means "not set"
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None:
        raise ConfigError(f"{name} must be {allowed}, got {raw!r} (unset it for the default, {default})")
    return value


def _env_int(name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    def parse(raw: str) -> int | None:
        value = int(raw)
        return value if value >= minimum and (maximum is None or value <= maximum) else None

    allowed = "a positive integer" if maximum is None else f"an integer from {minimum} to {maximum}"
    return _env(name, default, parse, allowed)


def _env_number(name: str, default: float, minimum: float) -> float:
    def parse(raw: str) -> float | None:
        value = float(raw)
        return value if value >= minimum else None  # NaN compares false: refused too

    return _env(name, default, parse, f"a number >= {minimum:g}")
