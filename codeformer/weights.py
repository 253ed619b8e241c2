"""The three weight files: where they come from, how they are fetched, how they load.

Spec: docs/reference.md §1. Each file is looked up in one folder (an explicit argument, else
``Settings.weights_dir``: ``CODEFORMER_WEIGHTS_DIR`` or ``weights/`` at the project root)
and downloaded on first use from its official release URL, or from ``Settings.weights_url``
(``CODEFORMER_WEIGHTS_URL``) + file name when a mirror is set. A download goes to a
unique temporary file in the same folder, is fsynced and checked against Content-Length,
and is renamed into place only when complete, under an exclusive lock per file, so a
partial file is never loaded and two processes can fetch at once. A file that does not
load strictly is deleted and fetched again once.

A file that is present is never compared with the network (no HEAD request, no hash
fetched): it is read, its keys and shapes are checked against the net, and it is loaded
strictly. Only a missing file, or one that fails those checks, is downloaded. So a Cog
image built with the files in ``weights/`` boots without the network.
``record_load_times`` splits the time spent into reading, verifying and assigning.

    python -m codeformer.weights fetch [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import fcntl
import logging
import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import requests
import torch
from tqdm import tqdm

from codeformer.config import Settings
from codeformer.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    from codeformer.nets import CodeFormer, ParseNet, RetinaFace

# a fixed name: under `python -m codeformer.weights` the module is `__main__`
logger = logging.getLogger("codeformer.weights")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RELEASE_URL = "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0"

CHUNK_BYTES = 1 << 20
FETCH_COMMAND = "python -m codeformer.weights fetch"
# Prefixes that wrappers add to every key: nn.DataParallel / DistributedDataParallel save
# "module.", torch.compile's OptimizedModule saves "_orig_mod.".
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LISTED_KEYS = 5  # how many offending keys an error message names

Container = Literal["params_ema", "module.", "flat"]


@dataclass(frozen=True)
class WeightFile:
    """One release file and the net it fills."""

    net: str  # short name, the key of WEIGHT_FILES
    name: str  # file name, in the weights folder and at the end of the URL
    url: str  # official release URL (docs/reference.md §1)
    container: Container  # "params_ema": {"params_ema": sd}; "module.": keys prefixed; "flat": bare sd
    net_class: str  # class in codeformer.nets


WEIGHT_FILES: dict[str, WeightFile] = {
    weight.net: weight
    for weight in (
        WeightFile(
            "codeformer", "codeformer.pth", f"{RELEASE_URL}/codeformer.pth", "params_ema", "CodeFormer"
        ),
        WeightFile(
            "retinaface",
            "detection_Resnet50_Final.pth",
            f"{RELEASE_URL}/detection_Resnet50_Final.pth",
            "module.",
            "RetinaFace",
        ),
        WeightFile(
            "parsenet", "parsing_parsenet.pth", f"{RELEASE_URL}/parsing_parsenet.pth", "flat", "ParseNet"
        ),
    )
}


@dataclass
class LoadTimes:
    """Milliseconds spent on weight files that were present, summed over the files loaded."""

    read_ms: float = 0.0  # torch.load of the file
    verify_ms: float = 0.0  # unwrap the container, check every key, type and shape against the net
    assign_ms: float = 0.0  # load_state_dict(strict=True)
    files: list[str] = field(default_factory=list)  # names of the files loaded, in order

    @property
    def load_ms(self) -> float:
        """Reading plus assigning: what loading costs besides verifying."""
        return self.read_ms + self.assign_ms


# The collector of the innermost record_load_times block. A context variable rather than a
# parameter: the loads run deep inside Restorer.load, whose signature should not grow a
# timing argument, and a context variable stays private to the thread (and task) that set it.
_load_times: contextvars.ContextVar[LoadTimes | None] = contextvars.ContextVar("load_times", default=None)


@contextlib.contextmanager
def record_load_times() -> Iterator[LoadTimes]:
    """Collect the read/verify/assign times of every weight file loaded inside the block."""
    times = LoadTimes()
    token = _load_times.set(times)
    try:
        yield times
    finally:
        _load_times.reset(token)


class _RetryableDownloadError(Exception):
    """A download attempt failed in a way that another attempt may fix."""


# -- where ---------------------------------------------------------------------------------
def weights_dir(override: str | Path | None = None, settings: Settings | None = None) -> Path:
    """The weights folder: ``override``, else ``settings.weights_dir`` (default: the environment's)."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    return (settings or Settings.from_env()).weights_dir


def weight_file(net: str) -> WeightFile:
    try:
        return WEIGHT_FILES[net]
    except KeyError:
        raise WeightsError(f"unknown net {net!r}; the weight files are for {sorted(WEIGHT_FILES)}") from None


def source_url(weight: WeightFile, settings: Settings | None = None) -> str:
    """Where ``weight`` is downloaded from: the mirror in ``settings.weights_url`` if set."""
    mirror = (settings or Settings.from_env()).weights_url
    if mirror:
        return mirror.rstrip("/") + "/" + weight.name
    return weight.url


# -- fetch ---------------------------------------------------------------------------------
def ensure_file(net: str, directory: str | Path | None = None, settings: Settings | None = None) -> Path:
    """Path of the weight file of ``net`` in the weights folder, downloading it if missing."""
    settings = settings or Settings.from_env()
    weight = weight_file(net)
    folder = weights_dir(directory, settings)
    path = folder / weight.name
    if path.is_file():
        return path
    with _file_lock(path):
        # another process may have finished the download while we waited for the lock
        if not path.is_file():
            _download(source_url(weight, settings), path, settings)
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock for fetching ``path``, shared by every process on this machine."""
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WeightsError(
            f"cannot create the weights folder or lock file {lock_path}: {error}. "
            f"Make the folder writable, or point CODEFORMER_WEIGHTS_DIR at a writable folder."
        ) from error
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        # A temporary file of this weight that exists while we hold the lock belongs to a
        # process that died mid-download: nothing else writes one without the lock.
        for stale in path.parent.glob(f".{path.name}.*.part"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(lock_fd)  # releases the flock


def _download(url: str, destination: Path, settings: Settings) -> None:
    """Download ``url`` to ``destination`` atomically, retrying transient failures."""
    timeout = settings.download_timeout_s
    attempts = settings.download_attempts
    backoff = settings.download_backoff_s
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, destination, timeout)
            return
        except _RetryableDownloadError as error:
            if attempt == attempts:
                raise WeightsError(
                    _unreachable_message(destination, url, f"{error} ({attempts} attempts)")
                ) from error
            wait = backoff * 2 ** (attempt - 1)
            logger.warning(
                "download of %s failed (attempt %d of %d): %s; retrying in %.1f s",
                url,
                attempt,
                attempts,
                error,
                wait,
            )
            time.sleep(wait)
        except OSError as error:  # the folder side: disk full, read-only, permissions
            raise WeightsError(
                f"cannot write {destination.name} into {destination.parent}: {error}. Fix: free disk space "
                f"or make the folder writable, or set CODEFORMER_WEIGHTS_DIR to another folder."
            ) from error


def _unreachable_message(destination: Path, url: str, reason: str) -> str:
    return (
        f"weight file {destination.name} is not in {destination.parent} and could not be downloaded "
        f"from {url}: {reason}. Fix: put {destination.name} into {destination.parent}, or set "
        "CODEFORMER_WEIGHTS_DIR to a folder that holds it, or set CODEFORMER_WEIGHTS_URL to a base URL that "
        f"serves it, or run `{FETCH_COMMAND}` where the network is reachable."
    )


def _download_once(url: str, destination: Path, timeout: float) -> None:
    # mkstemp: a unique name per attempt, in the destination folder so the rename is atomic
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    temp_path = Path(temp_name)
    started = time.monotonic()
    try:
        with os.fdopen(fd, "wb") as out:
            written, expected_bytes = _stream(url, out, destination, timeout)
            out.flush()
            os.fsync(out.fileno())
        if expected_bytes is not None and written != expected_bytes:
            raise _RetryableDownloadError(f"short read: got {written} bytes of {expected_bytes}")
        if written == 0:
            raise _RetryableDownloadError("the server sent an empty body")
        os.replace(temp_path, destination)
        _fsync_directory(destination.parent)
    finally:
        temp_path.unlink(missing_ok=True)
    logger.info(
        "downloaded %s: %s in %.1f s", destination.name, _human_size(written), time.monotonic() - started
    )


def _stream(url: str, out: BinaryIO, destination: Path, timeout: float) -> tuple[int, int | None]:
    """Write the body of ``url`` to ``out``; returns (bytes written, Content-Length or None)."""
    try:
        # identity encoding: the bytes on the wire are the file, so Content-Length counts them
        response = requests.get(
            url, stream=True, timeout=(timeout, timeout), headers={"Accept-Encoding": "identity"}
        )
    except requests.RequestException as error:
        raise _RetryableDownloadError(f"{type(error).__name__}: {error}") from error
    with response:
        if response.status_code == 404:
            raise WeightsError(
                _unreachable_message(destination, url, "HTTP 404 Not Found (no such file at that URL)")
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise _RetryableDownloadError(f"HTTP {response.status_code} {response.reason}")
        if response.status_code != 200:
            raise WeightsError(
                _unreachable_message(destination, url, f"HTTP {response.status_code} {response.reason}")
            )
        header_length = response.headers.get("Content-Length", "")
        expected_bytes = int(header_length) if header_length.isdigit() else None
        logger.info(
            "downloading %s (%s) from %s into %s",
            destination.name,
            _human_size(expected_bytes),
            url,
            destination.parent,
        )
        written = 0
        progress = tqdm(
            total=expected_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=destination.name,
            file=sys.stderr,
            disable=None,  # no bar when stderr is not a terminal
        )
        with progress:
            try:
                for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                    out.write(chunk)
                    written += len(chunk)
                    progress.update(len(chunk))
            except requests.RequestException as error:
                raise _RetryableDownloadError(
                    f"connection lost after {written} of {_human_size(expected_bytes)}: {error}"
                ) from error
    return written, expected_bytes


def _fsync_directory(folder: Path) -> None:
    """Make the rename durable: a crash must not leave the name pointing nowhere."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "unknown size"
    if num_bytes < 1024 * 1024:
        return f"{num_bytes} B"
    return f"{num_bytes / (1024 * 1024):.1f} MiB"


# -- load ----------------------------------------------------------------------------------
def checkpoint_filter_fn(checkpoint: object, weight: WeightFile) -> OrderedDict[str, torch.Tensor]:
    """The bare state dict inside a loaded release file: unwrap ``params_ema``, strip prefixes.

    Raises WeightsError when ``checkpoint`` is not a dict of tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(
            f"{weight.name} holds a {type(checkpoint).__name__}, not a dict of tensors "
            f"(expected layout: {_layout(weight)})"
        )
    # Only the EMA weights are used for inference (docs/reference.md §1); the training "params" entry is not.
    state_dict = checkpoint.get("params_ema", checkpoint)
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"{weight.name}: 'params_ema' is a {type(state_dict).__name__}, not a state dict")
    cleaned: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"{weight.name}: entry {key!r} is a {type(value).__name__}, not a tensor "
                f"(expected layout: {_layout(weight)})"
            )
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        cleaned[name] = value
    # The new dict carries no `_metadata`: the saved per-module versions were recorded
    # under the prefixed names and no longer apply, and without them BatchNorm accepts a
    # file that lacks `num_batches_tracked` (docs/reference.md §1 caveat; the counter never affects
    # inference).
    return cleaned


def _layout(weight: WeightFile) -> str:
    return {
        "params_ema": "a dict with the state dict under 'params_ema'",
        "module.": "a flat state dict with 'module.'-prefixed keys",
        "flat": "a flat state dict",
    }[weight.container]


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    more = f", ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
    return f"{len(keys)}: {shown}{more}"


def _check_fits(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, weight: WeightFile) -> None:
    """Name the keys that would make a strict load fail, before any parameter is touched."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_list_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_list_keys(mismatched)}")
    if problems:
        raise WeightsError(
            f"{weight.name} does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + f" (expected layout: {_layout(weight)})"
        )


def _load_strict(path: Path, weight: WeightFile, model: torch.nn.Module) -> None:
    """Load ``path`` into ``model`` strictly; any failure is a WeightsError naming the path."""
    times = _load_times.get()
    try:
        started = time.perf_counter()
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling raises many types; all mean "this file is unusable"
            raise WeightsError(
                f"cannot read it ({type(error).__name__}: {_first_line(error)}); "
                "it is truncated, corrupt or not a PyTorch checkpoint"
            ) from error
        read_at = time.perf_counter()
        state_dict = checkpoint_filter_fn(checkpoint, weight)
        _check_fits(state_dict, model, weight)
        verified_at = time.perf_counter()
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise WeightsError(str(error)) from error
        if times is not None:
            times.read_ms += (read_at - started) * 1000.0
            times.verify_ms += (verified_at - read_at) * 1000.0
            times.assign_ms += (time.perf_counter() - verified_at) * 1000.0
            times.files.append(path.name)
    except WeightsError as error:
        raise WeightsError(f"weight file {path} does not load into {weight.net_class}: {error}") from error


def _first_line(error: Exception) -> str:
    """The informative line of a torch.load error (its weights_only errors run to a page of advice)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def load_into(
    net_name: str,
    model: torch.nn.Module,
    directory: str | Path | None = None,
    settings: Settings | None = None,
) -> torch.nn.Module:
    """Fill ``model`` with its release file (strict); a file that fails is fetched again once."""
    settings = settings or Settings.from_env()
    weight = weight_file(net_name)
    path = ensure_file(net_name, directory, settings)
    try:
        _load_strict(path, weight, model)
        return model
    except WeightsError as first_error:
        failed_file = _identity(path)
        url = source_url(weight, settings)
        logger.warning("%s; deleting it and downloading it again from %s", first_error, url)
        try:
            with _file_lock(path):
                # Delete only the file that failed: if another process has replaced it
                # meanwhile, load its fresh copy instead of fetching a third one.
                if _identity(path) == failed_file:
                    path.unlink(missing_ok=True)
                if not path.is_file():
                    _download(url, path, settings)
        except (WeightsError, OSError) as refetch_error:
            raise WeightsError(f"{first_error}. Fetching it again failed: {refetch_error}") from refetch_error
    try:
        _load_strict(path, weight, model)
    except WeightsError as second_error:
        raise WeightsError(
            f"{second_error}. The file was downloaded again from {url} and still does not load: "
            "the source serves a wrong file; replace it, or set CODEFORMER_WEIGHTS_URL to a correct mirror."
        ) from second_error
    return model


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def load_nets(
    directory: str | Path | None = None, settings: Settings | None = None
) -> tuple[CodeFormer, RetinaFace, ParseNet]:
    """The three nets with their release weights, in eval mode, on the CPU."""
    from codeformer.nets import CodeFormer, ParseNet, RetinaFace

    settings = settings or Settings.from_env()
    codeformer = load_into("codeformer", CodeFormer(), directory, settings).eval()
    retinaface = load_into("retinaface", RetinaFace(), directory, settings).eval()
    parsenet = load_into("parsenet", ParseNet(), directory, settings).eval()
    return codeformer, retinaface, parsenet


# -- command line --------------------------------------------------------------------------
def _verify(net: str, directory: str | Path | None, settings: Settings) -> Path:
    from codeformer import nets

    weight = WEIGHT_FILES[net]
    model = getattr(nets, weight.net_class)()
    load_into(net, model, directory, settings)
    return weights_dir(directory, settings) / weight.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codeformer.weights",
        description="Download the missing CodeFormer weight files and check that each loads strictly.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download what is missing, then verify all three files")
    fetch.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"weights folder (default: $CODEFORMER_WEIGHTS_DIR or {Settings.weights_dir})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    failures = 0
    for net in WEIGHT_FILES:
        # go on after a failure: the report should name every file that is not usable
        try:
            path = _verify(net, args.dir, settings)
        except WeightsError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            failures += 1
            continue
        print(f"{path.name}\t{_human_size(path.stat().st_size)}\t{path}\tok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
