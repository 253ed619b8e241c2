"""The weights manager against a real HTTP server on 127.0.0.1: download, cache, retry, refetch, load."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import recording_connections, run_python_together
from weights_server import FileServer

from codeformer import weights
from codeformer.errors import WeightsError
from codeformer.tools import local_server, random_weights

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARSENET = weights.WEIGHT_FILES["parsenet"].name
RETINAFACE = weights.WEIGHT_FILES["retinaface"].name
CODEFORMER = weights.WEIGHT_FILES["codeformer"].name
# the variables codeformer.config.Settings reads for the weights
WEIGHTS_DIR_ENV = "CODEFORMER_WEIGHTS_DIR"
WEIGHTS_URL_ENV = "CODEFORMER_WEIGHTS_URL"
TIMEOUT_ENV = "CODEFORMER_DOWNLOAD_TIMEOUT"
ATTEMPTS_ENV = "CODEFORMER_DOWNLOAD_ATTEMPTS"
BACKOFF_ENV = "CODEFORMER_DOWNLOAD_BACKOFF"
ENV_VARS = (WEIGHTS_DIR_ENV, WEIGHTS_URL_ENV, TIMEOUT_ENV, ATTEMPTS_ENV, BACKOFF_ENV)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited settings; retries without the production backoff so failures are quick."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ATTEMPTS_ENV, "3")
    monkeypatch.setenv(BACKOFF_ENV, "0.01")
    monkeypatch.setenv(TIMEOUT_ENV, "10")


@pytest.fixture
def served(tmp_path: Path) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def server(served: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    with FileServer(served) as running:
        monkeypatch.setenv(WEIGHTS_URL_ENV, running.url)
        yield running


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty weights folder (not created yet: the manager must create it)."""
    return tmp_path / "cache"


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    return local_server.closed_port_url()


def dummy_bytes(size: int, seed: int = 0) -> bytes:
    return (
        torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.part"))


# -- where ---------------------------------------------------------------------------------
def test_weights_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights.weights_dir() == PROJECT_ROOT / "weights"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "from-env"))
    assert weights.weights_dir() == tmp_path / "from-env"
    assert weights.weights_dir(tmp_path / "argument") == tmp_path / "argument"
    assert weights.weights_dir(str(tmp_path / "argument")) == tmp_path / "argument"


def test_table_names_official_release(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(weights.WEIGHT_FILES) == {"codeformer", "retinaface", "parsenet"}
    for weight in weights.WEIGHT_FILES.values():
        assert weight.url == f"https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/{weight.name}"
        assert weights.source_url(weight) == weight.url
    assert {w.name: w.container for w in weights.WEIGHT_FILES.values()} == {
        CODEFORMER: "params_ema",
        RETINAFACE: "module.",
        PARSENET: "flat",
    }
    monkeypatch.setenv(WEIGHTS_URL_ENV, "http://mirror.example/weights/")
    assert weights.source_url(weights.WEIGHT_FILES["parsenet"]) == f"http://mirror.example/weights/{PARSENET}"


# -- download mechanics (small dummy files: ensure_file does not look inside) ---------------
def test_first_use_downloads_then_reads_cache(server: FileServer, served: Path, cache: Path) -> None:
    payload = dummy_bytes(300_000)
    (served / PARSENET).write_bytes(payload)

    path = weights.ensure_file("parsenet", cache)
    assert path == cache / PARSENET
    assert path.read_bytes() == payload
    assert server.request_count(PARSENET) == 1

    assert weights.ensure_file("parsenet", cache) == path
    assert server.request_count(PARSENET) == 1  # the cached file, no second request
    assert leftovers(cache) == []


def test_directory_from_environment(server: FileServer, served: Path, cache: Path, monkeypatch) -> None:
    (served / RETINAFACE).write_bytes(dummy_bytes(1000))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(cache))
    assert weights.ensure_file("retinaface") == cache / RETINAFACE
    assert (cache / RETINAFACE).read_bytes() == (served / RETINAFACE).read_bytes()


@pytest.mark.parametrize("mode", ["cut", "truncated", "server_error", "slow"])
def test_failed_attempt_is_retried(
    mode: str, server: FileServer, served: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = dummy_bytes(1_000_000, seed=1)
    (served / PARSENET).write_bytes(payload)
    if mode == "slow":
        monkeypatch.setenv(TIMEOUT_ENV, "0.2")  # the server stays silent for 2 s: a read timeout
    server.fail(PARSENET, mode, times=1, delay=2.0)

    path = weights.ensure_file("parsenet", cache)

    assert path.read_bytes() == payload
    assert server.request_count(PARSENET) == 2
    assert server.completed_count(PARSENET) == 1
    assert leftovers(cache) == []


def test_stale_temp_file_of_a_dead_download_is_removed(server: FileServer, served: Path, cache: Path) -> None:
    (served / PARSENET).write_bytes(dummy_bytes(1000))
    cache.mkdir()
    stale = cache / f".{PARSENET}.dead1234.part"
    stale.write_bytes(b"half a file")

    weights.ensure_file("parsenet", cache)

    assert not stale.exists()
    assert leftovers(cache) == []


def test_every_attempt_cut_gives_up_without_a_file(server: FileServer, served: Path, cache: Path) -> None:
    (served / PARSENET).write_bytes(dummy_bytes(200_000))
    server.fail(PARSENET, "truncated")

    with pytest.raises(WeightsError) as raised:
        weights.ensure_file("parsenet", cache)

    message = str(raised.value)
    assert "short read" in message or "connection lost" in message
    assert "3 attempts" in message
    assert server.request_count(PARSENET) == 3
    assert not (cache / PARSENET).exists()
    assert leftovers(cache) == []


def test_404_is_final_and_named(server: FileServer, cache: Path) -> None:
    with pytest.raises(WeightsError) as raised:
        weights.ensure_file("parsenet", cache)

    message = str(raised.value)
    assert "404" in message
    assert server.url_for(PARSENET) in message
    assert server.request_count(PARSENET) == 1  # not retried
    assert not (cache / PARSENET).exists()


def test_unreachable_server_names_folder_and_fixes(
    closed_port_url: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WEIGHTS_URL_ENV, closed_port_url)

    with pytest.raises(WeightsError) as raised:
        weights.ensure_file("retinaface", cache)

    message = str(raised.value)
    for expected in (
        RETINAFACE,
        closed_port_url + RETINAFACE,
        str(cache),
        "CODEFORMER_WEIGHTS_DIR",
        "CODEFORMER_WEIGHTS_URL",
        "python -m codeformer.weights fetch",
    ):
        assert expected in message
    assert leftovers(cache) == []


@pytest.mark.process  # two fresh interpreters importing torch
def test_two_processes_fetch_one_file(server: FileServer, served: Path, cache: Path) -> None:
    payload = dummy_bytes(1_500_000, seed=2)
    (served / PARSENET).write_bytes(payload)
    # slow enough (24 chunks x 0.05 s) that the second process arrives while the first downloads
    server.fail(PARSENET, "slow", delay=0.05)
    script = f"""
        import hashlib
        from codeformer.weights import ensure_file
        path = ensure_file("parsenet", {str(cache)!r})
        print(hashlib.sha256(path.read_bytes()).hexdigest())
        """
    expected_digest = hashlib.sha256(payload).hexdigest()
    for process in run_python_together(script, timeout_s=120):
        assert process.returncode == 0, process.stderr
        assert process.stdout.strip() == expected_digest  # each process saw the complete file
    assert (cache / PARSENET).read_bytes() == payload
    assert server.request_count(PARSENET) in (1, 2)
    assert server.completed_count(PARSENET) == server.request_count(PARSENET)
    assert leftovers(cache) == []


# -- loading (real file formats from codeformer.tools.random_weights) ----------------------------
@pytest.fixture(scope="session")
def parsenet_bytes(weights_dir: Path) -> bytes:
    return (weights_dir / PARSENET).read_bytes()


def parsenet_model() -> torch.nn.Module:
    from codeformer.nets import ParseNet

    return ParseNet()


def assert_holds(model: torch.nn.Module, expected: OrderedDict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.nets  # the three full-size nets, built and loaded
@pytest.mark.parametrize("seed", [0, 1])
def test_load_nets_strict_for_random_files(
    seed: int, weights_dir: Path, tmp_path: Path, closed_port_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WEIGHTS_URL_ENV, closed_port_url)  # any download attempt would fail
    folder = weights_dir
    if seed != 0:
        folder = tmp_path / f"seed{seed}"
        random_weights.write(folder, seed=seed)

    codeformer, retinaface, parsenet = weights.load_nets(folder)

    for model, file in ((codeformer, CODEFORMER), (retinaface, RETINAFACE), (parsenet, PARSENET)):
        assert not model.training
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert_holds(model, random_weights.state_dict(file, seed=seed))


@pytest.mark.parametrize(
    "damage",
    ["truncated", "corrupt", "empty", "not_a_dict"],
)
def test_damaged_cached_file_is_fetched_again(
    damage: str, server: FileServer, served: Path, cache: Path, parsenet_bytes: bytes, tmp_path: Path
) -> None:
    (served / PARSENET).write_bytes(parsenet_bytes)
    cache.mkdir()
    if damage == "truncated":
        (cache / PARSENET).write_bytes(parsenet_bytes[: len(parsenet_bytes) // 2])
    elif damage == "corrupt":
        (cache / PARSENET).write_bytes(dummy_bytes(4096, seed=3))
    elif damage == "empty":
        (cache / PARSENET).write_bytes(b"")
    else:
        torch.save([torch.zeros(3)], cache / PARSENET)

    model = weights.load_into("parsenet", parsenet_model(), cache)

    assert server.request_count(PARSENET) == 1
    assert (cache / PARSENET).read_bytes() == parsenet_bytes
    assert_holds(model, random_weights.state_dict(PARSENET, seed=0))
    assert leftovers(cache) == []


def test_wrong_key_is_named_after_one_refetch(server: FileServer, served: Path, cache: Path) -> None:
    state = random_weights.state_dict(PARSENET, seed=0)
    state["encoder.0.conv2d.wieght"] = state.pop("encoder.0.conv2d.weight")
    torch.save(state, served / PARSENET)  # the source itself serves the bad file

    with pytest.raises(WeightsError) as raised:
        weights.load_into("parsenet", parsenet_model(), cache)

    message = str(raised.value)
    assert "encoder.0.conv2d.wieght" in message  # unexpected
    assert "encoder.0.conv2d.weight" in message  # missing
    assert "missing keys 1" in message and "unexpected keys 1" in message
    assert str(cache / PARSENET) in message
    assert server.request_count(PARSENET) == 2  # first use, then the one refetch


def test_shape_mismatch_is_named(server: FileServer, served: Path, cache: Path) -> None:
    state = random_weights.state_dict(PARSENET, seed=0)
    state["encoder.0.conv2d.bias"] = torch.zeros(65)
    torch.save(state, served / PARSENET)

    with pytest.raises(WeightsError, match=r"encoder\.0\.conv2d\.bias \(file \(65,\), model \(64,\)\)"):
        weights.load_into("parsenet", parsenet_model(), cache)


def test_bad_cache_and_unreachable_source_names_both(
    cache: Path, closed_port_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(WEIGHTS_URL_ENV, closed_port_url)
    cache.mkdir()
    (cache / PARSENET).write_bytes(b"not a checkpoint")

    with pytest.raises(WeightsError) as raised:
        weights.load_into("parsenet", parsenet_model(), cache)

    message = str(raised.value)
    assert str(cache / PARSENET) in message and "cannot read it" in message
    assert "Fetching it again failed" in message and "CODEFORMER_WEIGHTS_URL" in message


# -- present files: no network (the Cog image's cold start) --------------------------------
@pytest.fixture
def connections() -> Iterator[list[object]]:
    """Every address this process connects a socket to during the test, by any library."""
    with recording_connections() as made:
        yield made


def serve_copies(weights_dir: Path, served: Path, names: tuple[str, ...]) -> None:
    """The mirror serves the very files: a download would succeed silently, only the counts show it."""
    for name in names:
        (served / name).symlink_to(weights_dir / name)


def test_present_file_is_verified_and_loaded_without_any_request(
    weights_dir: Path, server: FileServer, served: Path, connections: list[object]
) -> None:
    serve_copies(weights_dir, served, (PARSENET,))

    with weights.record_load_times() as times:
        model = weights.load_into("parsenet", parsenet_model(), weights_dir)

    assert server.request_count(PARSENET) == 0
    assert connections == []
    assert times.files == [PARSENET]
    assert times.load_ms == times.read_ms + times.assign_ms
    assert_holds(model, random_weights.state_dict(PARSENET, seed=0))


@pytest.mark.nets  # the three full-size nets, built, loaded and set up
def test_restorer_load_with_the_files_present_makes_no_request(
    weights_dir: Path, server: FileServer, served: Path, connections: list[object]
) -> None:
    from codeformer.pipeline import Restorer

    names = (CODEFORMER, RETINAFACE, PARSENET)
    serve_copies(weights_dir, served, names)

    with weights.record_load_times() as times:
        Restorer.load(weights_dir, "cpu")

    assert [server.request_count(name) for name in names] == [0, 0, 0]
    assert connections == []
    assert times.files == list(names)  # each file read and verified once, none fetched again


def test_load_times_are_collected_only_inside_the_block(
    weights_dir: Path, closed_port_url: str, monkeypatch
) -> None:
    monkeypatch.setenv(WEIGHTS_URL_ENV, closed_port_url)
    with weights.record_load_times() as outer:
        with weights.record_load_times() as inner:
            weights.load_into("parsenet", parsenet_model(), weights_dir)
        weights.load_into("parsenet", parsenet_model(), weights_dir)
    weights.load_into("parsenet", parsenet_model(), weights_dir)  # no block: nothing is recorded

    assert inner.files == [PARSENET]
    assert outer.files == [PARSENET]  # the inner block's load went to the inner collector only


def test_checkpoint_filter_fn_unwraps_and_strips() -> None:
    tensor = torch.ones(2)
    codeformer = weights.WEIGHT_FILES["codeformer"]
    wrapped = {"params_ema": {"module._orig_mod.a.weight": tensor, "b": tensor}, "params": {"c": tensor}}
    assert list(weights.checkpoint_filter_fn(wrapped, codeformer)) == ["a.weight", "b"]
    with pytest.raises(WeightsError, match="not a dict"):
        weights.checkpoint_filter_fn([tensor], codeformer)
    with pytest.raises(WeightsError, match="not a tensor"):
        weights.checkpoint_filter_fn({"a": 1.0}, codeformer)


def test_missing_batchnorm_counters_are_tolerated(tmp_path: Path, closed_port_url: str, monkeypatch) -> None:
    """Spec §1 caveat: the official detector load tolerates files saved without num_batches_tracked."""
    monkeypatch.setenv(WEIGHTS_URL_ENV, closed_port_url)
    state = random_weights.state_dict(PARSENET, seed=0)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters  # ParseNet has BatchNorm layers
    torch.save(OrderedDict((k, v) for k, v in state.items() if k not in counters), tmp_path / PARSENET)

    model = weights.load_into("parsenet", parsenet_model(), tmp_path)

    assert torch.equal(model.state_dict()["encoder.0.conv2d.weight"], state["encoder.0.conv2d.weight"])


# -- the Cog image -------------------------------------------------------------------------
def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context `cog build` copies to /src.

    Docker's rules: patterns are anchored at the project folder, ``*`` and ``?`` stay within
    one path segment, ``**`` spans any number, a pattern that matches a folder leaves out
    everything in it, ``!`` puts a path back, and the last matching line wins.
    """
    excluded = False
    for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = (
            re.escape(pattern.removeprefix("!").strip("/"))
            .replace(r"\*\*/", "(.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        if re.fullmatch(f"{regex}(/.*)?", path):
            excluded = not negated
    return excluded


def test_the_cog_image_gets_the_fetched_weight_files_but_not_fetch_leftovers() -> None:
    for name in (CODEFORMER, RETINAFACE, PARSENET):
        assert not dockerignore_excludes(f"weights/{name}"), name
    assert dockerignore_excludes(f"weights/.{CODEFORMER}.k2x9q_0a.part")  # mkstemp's name
    assert dockerignore_excludes(f"weights/.{CODEFORMER}.lock")
    # the matcher itself: what the file leaves out and what it keeps
    assert dockerignore_excludes("tests/test_weights.py")
    assert dockerignore_excludes("codeformer/nets/__pycache__/vqgan.cpython-311.pyc")
    assert not dockerignore_excludes("predict.py") and not dockerignore_excludes("codeformer/weights.py")


# -- command line --------------------------------------------------------------------------
def run_cli(*args: str, env_updates: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env_updates}
    return subprocess.run(
        [sys.executable, "-m", "codeformer.weights", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.process  # each CLI test starts a fresh interpreter that imports torch (3-10 s)
def test_cli_fetch_downloads_missing_and_verifies(
    weights_dir: Path, server: FileServer, served: Path, cache: Path
) -> None:
    for name in (RETINAFACE, PARSENET):
        os.link(weights_dir / name, served / name)
    cache.mkdir()
    # the large file is already there: fetch must keep it and download only the other two
    try:
        os.link(weights_dir / CODEFORMER, cache / CODEFORMER)
    except OSError:
        shutil.copyfile(weights_dir / CODEFORMER, cache / CODEFORMER)

    result = run_cli("fetch", "--dir", str(cache), env_updates={WEIGHTS_URL_ENV: server.url})

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [CODEFORMER, RETINAFACE, PARSENET]
    assert all("MiB" in line for line in lines)
    assert server.request_count(CODEFORMER) == 0
    assert server.request_count(RETINAFACE) == 1 and server.request_count(PARSENET) == 1
    for name in (RETINAFACE, PARSENET):
        assert (cache / name).read_bytes() == (weights_dir / name).read_bytes()


@pytest.mark.process
def test_cli_fetch_unreachable_exits_with_message(cache: Path, closed_port_url: str) -> None:
    result = run_cli("fetch", "--dir", str(cache), env_updates={WEIGHTS_URL_ENV: closed_port_url})

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: " in result.stderr
    assert result.stderr.count("error: ") == 3  # every file is reported, not just the first
    for name in (CODEFORMER, RETINAFACE, PARSENET):
        assert closed_port_url + name in result.stderr
    assert "CODEFORMER_WEIGHTS_URL" in result.stderr and "CODEFORMER_WEIGHTS_DIR" in result.stderr
    assert result.stdout == ""


@pytest.mark.process
def test_cli_fetch_with_a_bad_setting_exits_naming_the_variable(cache: Path) -> None:
    result = run_cli("fetch", "--dir", str(cache), env_updates={ATTEMPTS_ENV: "none"})

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("error: ") == 1  # read once, reported once
    assert "CODEFORMER_DOWNLOAD_ATTEMPTS must be a positive integer, got 'none'" in result.stderr
    assert not cache.exists()
