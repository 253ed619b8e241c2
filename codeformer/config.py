"""Named, frozen settings: what a request may choose, and what each choice means.

Profiles and stability modes are data, not code paths: the pipeline reads these fields
and ``codeformer.runtime`` is the one place that turns them into torch settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from codeformer.errors import ConfigError, InputError

FACE_SIZE = 512  # the aligned crop is FACE_SIZE x FACE_SIZE; CodeFormer's latent grid is hard-wired to it


@dataclass(frozen=True)
class Profile:
    """How much numeric fidelity to trade for speed."""

    name: str
    mixed_precision: bool  # fp16 autocast on CUDA, bf16 on CPU
    use_parse: bool  # ParseNet mask in paste-back (spec §6.3 step 9) or the plain soft mask (§6.4)


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
# "none" runs the channels_last nets without torch.compile; cudagraphs needs CUDA
COMPILE_BACKENDS = ("none", "eager", "aot_eager", "inductor", "cudagraphs")
CUDA_ONLY_BACKENDS = frozenset({"cudagraphs"})


@dataclass(frozen=True)
class RequestOptions:
    """The per-request choices, validated."""

    fidelity: float = 0.5
    profile: Profile = PROFILES["baseline"]
    stability: Stability = STABILITY_MODES["safe"]
    compile_backend: str = "none"

    @classmethod
    def parse(
        cls,
        fidelity: float = 0.5,
        profile: str = "baseline",
        stability: str = "safe",
        compile_backend: str = "none",
    ) -> RequestOptions:
        """Validate user-facing names and values; raises ``InputError`` naming the input."""
        try:
            fidelity = float(fidelity)
        except (TypeError, ValueError):
            raise InputError(
                f"codeformer_fidelity must be a number between 0 and 1, got {fidelity!r}"
            ) from None
        if not 0.0 <= fidelity <= 1.0:  # also rejects NaN
            raise InputError(f"codeformer_fidelity must be between 0 and 1, got {fidelity}")
        if profile not in PROFILES:
            raise InputError(f"runtime_profile must be one of {', '.join(PROFILES)}; got {profile!r}")
        if stability not in STABILITY_MODES:
            raise InputError(f"stability_mode must be one of {', '.join(STABILITY_MODES)}; got {stability!r}")
        if compile_backend not in COMPILE_BACKENDS:
            raise InputError(
                f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}; got {compile_backend!r}"
            )
        return cls(fidelity, PROFILES[profile], STABILITY_MODES[stability], compile_backend)


def env_int(name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    """A positive integer (or one in [minimum, maximum]) from the environment, or a clear error."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    wanted = "a positive integer" if maximum is None else f"an integer from {minimum} to {maximum}"
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {wanted}, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be {wanted}, got {raw!r}")
    return value


MIXED_PRECISION_CHOICES = ("auto", "on", "off")


def mixed_precision_from_env() -> str:
    """``CODEFORMER_MIXED_PRECISION``: whether fast/max_speed use reduced precision (auto: where it pays)."""
    value = os.environ.get("CODEFORMER_MIXED_PRECISION", "") or "auto"
    if value not in MIXED_PRECISION_CHOICES:
        raise ConfigError(
            f"CODEFORMER_MIXED_PRECISION must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {value!r}"
        )
    return value


# glibc takes the trim threshold as a C int: 2 GiB - 1 byte is the most it can hold
MAX_RETAINED_MEMORY_MB = 2047


@dataclass(frozen=True)
class Limits:
    """Guards against pathological inputs; fixed at process start."""

    max_pixels: int  # decoded images above this are refused from the header
    max_faces: int  # per image; the highest-scoring faces are kept
    face_batch: int  # faces per CodeFormer/ParseNet forward; bounds peak memory
    # freed host memory kept for reuse (codeformer.runtime.retain_freed_memory); 0: the C library's default
    retained_memory_mb: int = MAX_RETAINED_MEMORY_MB
    # one deadline for fetching all of a request's URL inputs (codeformer.fetch)
    fetch_timeout_s: float = 60.0

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> Limits:
        return cls(
            max_pixels=env_int("CODEFORMER_MAX_PIXELS", 40_000_000),
            max_faces=env_int("CODEFORMER_MAX_FACES", 20),
            face_batch=env_int("CODEFORMER_FACE_BATCH", DEFAULT_FACE_BATCH.get(device_type, 1)),
            retained_memory_mb=env_int(
                "CODEFORMER_RETAINED_MEMORY_MB", MAX_RETAINED_MEMORY_MB, 0, MAX_RETAINED_MEMORY_MB
            ),
            fetch_timeout_s=env_int("CODEFORMER_FETCH_TIMEOUT_S", 60, 1, 3600),
        )


# On a GPU, batching faces fills the device; on a CPU the convolutions are already
# parallel inside one face: with the retained heap, 4 faces took 12.1-13.2 s in batches of
# one and 12.8 s in batches of two (CodeFormer), 7.3-7.7 s against 8.2 s (ParseNet), and a
# batch of one holds half the activations.
DEFAULT_FACE_BATCH = {"cuda": 4, "cpu": 1}
