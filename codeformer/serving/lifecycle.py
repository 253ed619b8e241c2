"""A replica's life around coglet: predictions in flight, the drain before a stop, its probes, stale folders.

coglet 0.23 stops (SIGTERM, or ``POST /shutdown`` under ``--await-explicit-shutdown``) once
no HTTP connection is open: a synchronous prediction keeps it waiting, an async one does not,
and it is dropped with its webhook never sent. coglet shows no count of predictions in
flight (its health says ``BUSY`` only when every slot is taken). So the worker, which runs in
the image and in the local server alike, keeps one:

- ``InFlight`` (in the worker): a folder ``<temp>/codeformer-slots-<worker pid>-XXXXXXXX``
  holding one empty file per prediction in ``run()``; while the folder holds a ``draining``
  file, a new prediction fails at once with ``ShuttingDownError``;
- ``drain`` (anywhere on the machine: the local server on SIGTERM, a pre-stop step in the
  image): writes ``draining`` into every live worker's folder and waits until their
  predictions have left ``run()``; those that outlive the grace period are stopped and fail
  with ``ShuttingDownError`` naming it;
- ``probe``: liveness and readiness from coglet's ``/health-check`` (HTTP 200 in every state,
  so a probe must read the JSON) and the drain.

coglet's orchestrator makes a folder ``/tmp/coglet/predictions/<id>/`` (empty ``inputs/``
and ``outputs/``) for every prediction and never removes it. ``InFlight`` notes the id of
each prediction this worker served (a ``served-<id>`` file) and removes its folder once older
than ``PREDICTION_DIR_RETENTION_S``, and every one as the worker exits;
``remove_orphaned_slot_folders`` removes those a killed worker left. The folders of other
coglet servers sharing ``/tmp`` (other replicas, other models) are never touched: theirs may
belong to predictions still running.

    python -m codeformer.serving.lifecycle drain [--grace-s 300] [--worker PID] [--shutdown [--url URL]]
    python -m codeformer.serving.lifecycle probe live|ready [--url http://127.0.0.1:5000]
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from codeformer.errors import RequestCancelled, ShuttingDownError
from codeformer.serving.outputs import new_output_dir, orphaned_dirs, owner_pid_alive

logger = logging.getLogger(__name__)

SLOTS_DIR_PREFIX = "codeformer-slots-"
DRAINING_FILE = "draining"
ABANDON_FILE = "abandon"
ABANDON_POLL_S = 0.5
# seconds an abandoned prediction gets to reach its next cancel check (one forward) and fail
ABANDON_WAIT_S = 60.0
REQUEST_FILE_PREFIX = "request-"  # holds the prediction's id, when coglet gave one
SERVED_FILE_PREFIX = "served-"  # served-<id>: coglet's folder for <id> is this worker's to remove
# the ContextVar coglet's worker sets to the prediction's id around run() (cog's own async
# wrapper finds it by this name too); coglet 0.23 offers no public way to read the id
PREDICTION_ID_VAR = "_coglet_prediction_id"
SAFE_PREDICTION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")  # ids whose coglet folder this worker may remove
# where coglet 0.23's orchestrator puts a folder per prediction (a constant in coglet, not $TMPDIR)
COGLET_PREDICTIONS_DIR = Path("/tmp/coglet/predictions")
# seconds a prediction's coglet folder may outlive the prediction (the issue allows minutes)
PREDICTION_DIR_RETENTION_S = 120.0
SWEEP_INTERVAL_S = 30.0
# seconds a drain lets in-flight predictions finish: a request of four images at the pixel
# limit on the baseline profile fits well within it on a GPU
DEFAULT_SHUTDOWN_GRACE_S = 300.0
SHUTDOWN_GRACE_ENV = "CODEFORMER_SHUTDOWN_GRACE_S"
DRAIN_POLL_S = 0.1
# seconds between the last prediction leaving run() and the stop: coglet sends its terminal
# webhook after run() returns, and a webhook not yet sent when coglet stops is never sent
WEBHOOK_SETTLE_S = 1.0
DEFAULT_URL = "http://127.0.0.1:5000"

# coglet 0.23's health states (GET /health-check, "status"), what each means for a balancer
HEALTH_STATES = {
    "UNKNOWN": "no state yet (the server has just started)",
    "STARTING": "setup() runs: loading and warming the nets",
    "READY": "set up, at least one prediction slot free",
    "BUSY": "set up, every prediction slot taken",
    "SETUP_FAILED": "setup() failed: the replica will never serve",
    "DEFUNCT": "the worker hit a fatal error: the replica will never serve",
    "UNHEALTHY": "the worker is gone (killed, crashed) or failed its health check",
}
LIVE_STATES = frozenset({"UNKNOWN", "STARTING", "READY", "BUSY"})
# BUSY stays ready: its slots free within a request's time, and its 409 sends the caller to
# another replica; out of rotation at every full moment, a replica flaps with the traffic,
# and when all are busy the balancer has none left (refused connections, not a 409 to retry).
# coglet's own readiness file (/var/run/cog/ready) is written once set up, never removed.
READY_STATES = frozenset({"READY", "BUSY"})


def shutdown_grace_s() -> float:
    """``CODEFORMER_SHUTDOWN_GRACE_S`` (seconds, > 0), else ``DEFAULT_SHUTDOWN_GRACE_S``."""
    text = os.environ.get(SHUTDOWN_GRACE_ENV, "").strip()
    if not text:
        return DEFAULT_SHUTDOWN_GRACE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{SHUTDOWN_GRACE_ENV}={text!r}: give the drain's grace period in seconds (> 0)")
    return value


# -- the worker side ---------------------------------------------------------------------------
class InFlight:
    """This worker's predictions in ``run()``, as files a drain can read from another process.

    A drain whose grace period ran out writes ``abandon`` (holding the grace period) into the
    folder: a thread here then sets the cancel flag of every prediction still running, and
    each fails with ``ShuttingDownError`` naming the shutdown, which coglet still reports.
    """

    def __init__(self) -> None:
        remove_orphaned_slot_folders()  # those of workers that were killed
        self.folder = new_output_dir(SLOTS_DIR_PREFIX)
        self.abandoned_after_s: str | None = None  # the drain's grace period, once it ran out
        self._numbers = itertools.count()
        # request file -> (its prediction's id or None, its cancel flag)
        self._running: dict[Path, tuple[str | None, threading.Event | None]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._watch_abandon, name="codeformer-abandon", daemon=True).start()

    def draining(self) -> bool:
        return (self.folder / DRAINING_FILE).exists()

    @contextlib.contextmanager
    def request(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """The block of one prediction, whose work stops once ``cancel`` is set.

        Raises ``ShuttingDownError`` at once when a drain has begun, and instead of
        ``RequestCancelled`` when the drain's grace period ran out before the block ended.
        """
        if self.draining():
            raise ShuttingDownError(
                "this replica is shutting down and takes no new predictions; send it to another replica"
            )
        marker = self.folder / f"{REQUEST_FILE_PREFIX}{next(self._numbers)}"
        prediction_id = current_prediction_id()
        with self._lock:
            self._running[marker] = (prediction_id, cancel)
        marker.write_text(prediction_id or "")
        try:
            yield
        except RequestCancelled:
            if self.abandoned_after_s is None:
                raise
            raise ShuttingDownError(
                f"this replica stopped before the prediction finished (its shutdown grace period of "
                f"{self.abandoned_after_s} s ran out); send it again"
            ) from None
        finally:
            if prediction_id is not None:
                (self.folder / f"{SERVED_FILE_PREFIX}{prediction_id}").touch()
            marker.unlink(missing_ok=True)
            with self._lock:
                del self._running[marker]

    def _watch_abandon(self) -> None:
        abandon = self.folder / ABANDON_FILE
        while self.abandoned_after_s is None:
            time.sleep(ABANDON_POLL_S)
            if not self.folder.is_dir():
                return  # removed: the worker exits
            with contextlib.suppress(OSError):  # not there yet, or the folder was removed
                self.abandoned_after_s = abandon.read_text().strip() or "?"
        with self._lock:
            for _, cancel in self._running.values():
                if cancel is not None:
                    cancel.set()

    def remove_stale_prediction_dirs(
        self, retention_s: float = PREDICTION_DIR_RETENTION_S, root: Path = COGLET_PREDICTIONS_DIR
    ) -> int:
        """Remove coglet's folders of the predictions this worker served, once older than
        ``retention_s`` (those of predictions it runs again stay); returns how many."""
        with self._lock:
            running = {prediction_id for prediction_id, _ in self._running.values()}
        cutoff = time.time() - retention_s
        removed = 0
        for served in self.folder.glob(f"{SERVED_FILE_PREFIX}*"):
            prediction_id = served.name.removeprefix(SERVED_FILE_PREFIX)
            if prediction_id in running:
                continue
            with contextlib.suppress(OSError):  # gone already: only the note is left to remove
                if (root / prediction_id).stat().st_mtime >= cutoff:
                    continue
                shutil.rmtree(root / prediction_id)
                removed += 1
            served.unlink(missing_ok=True)
        return removed

    def remove(self) -> None:
        """As the worker exits: coglet's folders of every prediction it served, then its own."""
        self.remove_stale_prediction_dirs(retention_s=0.0)
        shutil.rmtree(self.folder, ignore_errors=True)


def current_prediction_id() -> str | None:
    """The id of the prediction whose ``run()`` calls this (coglet's ContextVar), if it can name a folder.

    An id from ``PUT /predictions/{id}`` is the caller's: only a short plain name (coglet's own
    are like ``pred_18eeee49ea886cdd``) is taken, so that no id can reach outside coglet's
    folder or make a file name the file system refuses (a NUL, a slash, over 255 bytes); the
    folder of any other id is left alone.
    """
    for var, value in contextvars.copy_context().items():
        if var.name == PREDICTION_ID_VAR and isinstance(value, str):
            return value if SAFE_PREDICTION_ID.fullmatch(value) and value not in {".", ".."} else None
    return None


def remove_orphaned_slot_folders(temp_dir: Path | None = None, root: Path = COGLET_PREDICTIONS_DIR) -> int:
    """Remove the ``InFlight`` folders of workers that were killed, with coglet's folders of the
    predictions they served or ran; returns how many folders went."""
    removed = 0
    for folder in orphaned_dirs(temp_dir, SLOTS_DIR_PREFIX):
        prediction_ids = [
            served.name.removeprefix(SERVED_FILE_PREFIX) for served in folder.glob(f"{SERVED_FILE_PREFIX}*")
        ]
        for request in folder.glob(f"{REQUEST_FILE_PREFIX}*"):
            with contextlib.suppress(OSError):
                prediction_ids.append(request.read_text())
        for prediction_id in filter(None, prediction_ids):
            if (root / prediction_id).is_dir():
                shutil.rmtree(root / prediction_id, ignore_errors=True)
                removed += 1
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def start_sweeper(sweep: Callable[[], object], interval_s: float = SWEEP_INTERVAL_S) -> threading.Thread:
    """Call ``sweep`` every ``interval_s`` on a daemon thread, so that folders go without new traffic."""

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            try:
                sweep()
            except Exception:
                logger.exception("removing stale folders failed; trying again in %.0f s", interval_s)

    thread = threading.Thread(target=loop, name="codeformer-sweeper", daemon=True)
    thread.start()
    return thread


# -- the drain (any process on the machine) -------------------------------------------------
def live_slot_folders(temp_dir: Path | None = None, owner_pid: int | None = None) -> list[Path]:
    """The ``InFlight`` folders of workers that still run (of worker ``owner_pid`` only, if given)."""
    pattern = f"{SLOTS_DIR_PREFIX}{owner_pid if owner_pid is not None else '*'}-*"
    folders = (temp_dir or Path(tempfile.gettempdir())).glob(pattern)
    return [folder for folder in folders if owner_pid_alive(folder, SLOTS_DIR_PREFIX)]


def drain(grace_s: float, temp_dir: Path | None = None, owner_pid: int | None = None) -> int:
    """Refuse new predictions in every live worker (or in ``owner_pid``); wait for the running ones.

    They get up to ``grace_s``; those still running then are stopped at their next cancel
    check and reported failed with ``ShuttingDownError`` naming the shutdown (``InFlight``).
    Returns how many had to be stopped (0: all finished).
    """
    for folder in live_slot_folders(temp_dir, owner_pid):
        with contextlib.suppress(OSError):  # the worker exited meanwhile
            (folder / DRAINING_FILE).touch()
    left = _wait_for_no_requests(grace_s, temp_dir, owner_pid)
    if left:
        for folder in live_slot_folders(temp_dir, owner_pid):
            with contextlib.suppress(OSError):
                (folder / ABANDON_FILE).write_text(f"{grace_s:g}")
        _wait_for_no_requests(ABANDON_WAIT_S, temp_dir, owner_pid)
    return left


def _wait_for_no_requests(timeout_s: float, temp_dir: Path | None, owner_pid: int | None) -> int:
    """Wait up to ``timeout_s`` until no prediction is in ``run()``; how many still are."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = sum(
            len(list(folder.glob(f"{REQUEST_FILE_PREFIX}*")))
            for folder in live_slot_folders(temp_dir, owner_pid)
        )
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(DRAIN_POLL_S)


def draining(temp_dir: Path | None = None) -> bool:
    return any((folder / DRAINING_FILE).exists() for folder in live_slot_folders(temp_dir))


# -- probes ------------------------------------------------------------------------------------
# the server is on this machine: no proxy from the environment may stand between
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def health_status(url: str, timeout_s: float = 5.0) -> str:
    """coglet's ``status`` from ``<url>/health-check`` ("no answer" when it does not answer)."""
    try:
        with _LOCAL.open(f"{url.rstrip('/')}/health-check", timeout=timeout_s) as response:
            return str(json.load(response).get("status", "no status"))
    except (OSError, ValueError):
        return "no answer"


def request_shutdown(url: str) -> None:
    """``POST <url>/shutdown``: coglet stops its worker and returns from ``serve``."""
    shutdown = urllib.request.Request(f"{url.rstrip('/')}/shutdown", method="POST")
    with contextlib.suppress(OSError), _LOCAL.open(shutdown, timeout=10):
        pass


def probe(kind: str, url: str) -> tuple[bool, str]:
    """(passes, why) for a ``live`` or ``ready`` probe of the server at ``url``."""
    status = health_status(url)
    if kind == "live":
        # "no answer" fails too: a server that stopped answering needs a restart as well
        return status in LIVE_STATES, f"health {status}"
    if draining():
        return False, f"health {status}, draining before a stop"
    return status in READY_STATES, f"health {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drain this machine's replica before a stop, or probe it.")
    commands = parser.add_subparsers(dest="command", required=True)
    drain_parser = commands.add_parser("drain", help="refuse new predictions, wait for the running ones")
    drain_parser.add_argument("--grace-s", type=float, help=f"default ${SHUTDOWN_GRACE_ENV}, else 300")
    drain_parser.add_argument("--worker", type=int, help="the worker's pid (default: every worker here)")
    drain_parser.add_argument(
        "--shutdown",
        action="store_true",
        help="then POST /shutdown (a server run with --await-explicit-shutdown)",
    )
    drain_parser.add_argument(
        "--url", default=DEFAULT_URL, help="the server for --shutdown, default %(default)s"
    )
    probe_parser = commands.add_parser("probe", help="exit 0 when the replica is live/ready, else 1")
    probe_parser.add_argument("kind", choices=["live", "ready"])
    probe_parser.add_argument("--url", default=DEFAULT_URL, help="default %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "probe":
        passes, why = probe(args.kind, args.url)
        print(f"{args.kind}: {'yes' if passes else 'no'} ({why})")
        return 0 if passes else 1
    try:
        grace_s = args.grace_s if args.grace_s is not None else shutdown_grace_s()
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    left = drain(grace_s, owner_pid=args.worker)
    if left:
        logger.error(
            "drain: %d prediction(s) still running after %.0f s were stopped and failed", left, grace_s
        )
    else:
        logger.info("drain: no prediction in flight")
    if args.shutdown:
        time.sleep(WEBHOOK_SETTLE_S)
        request_shutdown(args.url)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
