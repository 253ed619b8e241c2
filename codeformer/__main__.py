"""Restore faces in image files from the command line.

    python -m codeformer data/1.jpg [more images] [--output-dir out] [--fidelity 0.5]
        [--profile baseline|fast|max_speed] [--stability safe|optimized] [--compile-backend none]

The options and their defaults are those of a Cog request (codeformer.config.RequestOptions);
the CODEFORMER_* environment variables apply as in the server (codeformer.config.Settings).
Weights are downloaded into weights/ on first use (see codeformer/weights.py).
On a terminal a progress bar names the step running (codeformer.progress) and the log lines
print above it; into a file or a pipe only the log lines are written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from codeformer import config
from codeformer.config import RequestOptions, Settings
from codeformer.errors import CodeFormerError
from codeformer.progress import Progress

log = logging.getLogger("codeformer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codeformer", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--output-dir", type=Path, default=Path("out"))
    # the defaults of a Cog request
    parser.add_argument(
        "--fidelity", type=float, default=config.DEFAULT_FIDELITY, help="0 = more quality, 1 = more fidelity"
    )
    parser.add_argument("--profile", choices=list(config.PROFILES), default=config.DEFAULT_PROFILE)
    parser.add_argument("--stability", choices=list(config.STABILITY_MODES), default=config.DEFAULT_STABILITY)
    parser.add_argument(
        "--compile-backend", choices=config.COMPILE_BACKENDS, default=config.DEFAULT_COMPILE_BACKEND
    )
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tqdm.contrib.logging import logging_redirect_tqdm

    from codeformer.progress import TerminalProgress

    on_terminal = sys.stderr.isatty()
    progress = TerminalProgress(sys.stderr) if on_terminal else Progress()
    # on a terminal, log lines are written above the bar instead of through it
    with logging_redirect_tqdm() if on_terminal else contextlib.nullcontext():
        return _restore_files(args, progress)


def _restore_files(args: argparse.Namespace, progress: Progress) -> int:
    """Load the nets, restore ``args.images`` as one request, write the JPGs; the exit status."""
    from codeformer.pipeline import Restorer
    from codeformer.runtime import pick_device
    from codeformer.serving.request import restore_request

    try:
        options = RequestOptions.parse(args.fidelity, args.profile, args.stability, args.compile_backend)
        device = pick_device(args.device)
        start = time.perf_counter()
        restorer = Restorer.load(args.weights_dir, device, Settings.from_env(device.type))
        log.info("loaded the nets on %s in %.0f ms", restorer.device, (time.perf_counter() - start) * 1000)
        # the same request as the server's, reading local files wherever they are
        jpgs = restore_request(restorer, args.images, options, local_root=None, progress=progress)
    except CodeFormerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for path, jpg in zip(args.images, jpgs, strict=True):
        out = args.output_dir / f"{path.stem}.jpg"
        out.write_bytes(jpg)
        log.info("%s -> %s", path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
