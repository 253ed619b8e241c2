"""The command-line flags ``run_bench.py`` and ``bench_single_image.py`` share, their checks, the photos."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import harness

from codeformer.config import PROFILES
from codeformer.errors import ConfigError
from codeformer.serving.serve import DEFAULT_HOST, check_port_free


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Port, weights, server environment, fidelity, warm-up and repeats."""
    parser.add_argument(
        "--port", type=int, default=5000, help="port for the local server (default %(default)s)"
    )
    harness.add_weights_arguments(parser)
    parser.add_argument(
        "--server-env",
        action="append",
        metavar="KEY=VALUE",
        help="extra environment for the server, e.g. CODEFORMER_MAX_FACES=1 (repeatable)",
    )
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for READY")
    parser.add_argument(
        "--fidelity", type=float, default=0.5, help="codeformer_fidelity (default %(default)s)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests first (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (default %(default)s)")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, and logging set up for the progress lines on stderr."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args


def check_run_arguments(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """Refuse contradictory flags and a taken ``--port``; returns ``--server-env`` and ``--profiles``."""
    profiles = split_names(args.profiles, list(PROFILES), "--profiles")
    if not profiles:
        raise ConfigError("--profiles: name at least one profile")
    if getattr(args, "server_url", None) is None:
        # before anything slow: a taken port must never let another server answer for this run
        check_port_free(DEFAULT_HOST, args.port)
    if args.random_weights and args.weights_url:
        raise ConfigError("--random-weights and --weights-url exclude each other")
    if args.warmup < 0 or args.repeats < 1:
        raise ConfigError("--warmup must be >= 0 and --repeats >= 1")
    if not 0.0 <= args.fidelity <= 1.0:
        raise ConfigError(f"--fidelity must be between 0 and 1, got {args.fidelity}")
    env: dict[str, str] = {}
    for item in args.server_env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--server-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env, profiles


def split_names(values: Sequence[str] | None, allowed: Sequence[str], flag: str) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``, each checked against ``allowed``, order kept."""
    names: list[str] = []
    for name in (name.strip() for value in values or [] for name in value.split(",")):
        if name and name not in allowed:
            raise ConfigError(f"{flag}: unknown {name!r}; choose from {', '.join(allowed)}")
        if name and name not in names:
            names.append(name)
    return names


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def discover_images(image_dir: Path, selection: Sequence[str] | None = None) -> list[Path]:
    """The photos to send: ``selection`` is None (all of ``image_dir``), one count N (the first N
    in numeric order), or file names/paths (as given, else inside ``image_dir``)."""
    if selection and not (len(selection) == 1 and selection[0].isdigit()):
        paths = [Path(item) if Path(item).is_file() else image_dir / item for item in selection]
        for item, path in zip(selection, paths, strict=True):
            if not path.is_file():
                raise ConfigError(f"--images: no such file {item} (nor {image_dir / item})")
        return paths
    if not image_dir.is_dir():
        raise ConfigError(f"--image-dir: {image_dir} is not a folder")
    found = sorted(
        (p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: (0, int(p.stem)) if p.stem.isdigit() else (1, p.name),  # 2.jpg before 10.jpg
    )
    if not found:
        raise ConfigError(
            f"--image-dir: no {'/'.join(IMAGE_SUFFIXES)} files in {image_dir}; "
            "build samples with python data/make_samples.py"
        )
    count = int(selection[0]) if selection else len(found)
    if count < 1:
        raise ConfigError("--images: the count must be at least 1")
    if count > len(found):
        raise ConfigError(f"--images {count}: {image_dir} has only {len(found)} images")
    return found[:count]


def batches(paths: Sequence[Path], batch_size: int) -> list[list[Path]]:
    return [list(paths[start : start + batch_size]) for start in range(0, len(paths), batch_size)]
