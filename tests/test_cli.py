"""``python -m codeformer`` (codeformer/__main__.py) and the request's progress
(codeformer/progress.py): a bar that names each step on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from helpers import face_photo, flat_canvas, png_bytes

from codeformer.__main__ import main
from codeformer.config import RequestOptions
from codeformer.errors import CodeFormerError
from codeformer.progress import Progress, TerminalProgress, request_steps
from codeformer.serving.request import restore_request


class RecordedSteps(Progress):
    """Every call a request makes, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self, steps: int) -> None:
        self.calls.append(f"begin {steps}")

    def step(self, name: str) -> None:
        self.calls.append(name)

    def end(self) -> None:
        self.calls.append("end")


class TerminalStream(io.StringIO):
    """What a terminal would have been shown."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def faceless_restorer(faceless_weights_dir: Path):
    from codeformer.config import Settings
    from codeformer.pipeline import Restorer

    return Restorer.load(faceless_weights_dir, "cpu", Settings.from_env())


@pytest.fixture
def two_photos(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "face.png", tmp_path / "canvas.png"]
    paths[0].write_bytes(png_bytes(face_photo(96, 96)))
    paths[1].write_bytes(png_bytes(flat_canvas(80, 48)))
    return paths


def test_a_request_announces_each_step_in_the_order_it_runs(
    faceless_restorer, two_photos: list[Path]
) -> None:
    steps = RecordedSteps()
    restore_request(faceless_restorer, two_photos, RequestOptions(), local_root=None, progress=steps)
    assert steps.calls == [
        f"begin {request_steps(2)}",
        "images[0] (face.png): read",
        "images[1] (canvas.png): read",
        "images[0] (face.png): detect faces",
        "images[1] (canvas.png): detect faces",
        "restore 0 faces",
        "images[0] (face.png): paste back",
        "images[1] (canvas.png): paste back",
        "images[0] (face.png): encode",
        "images[1] (canvas.png): encode",
        "end",
    ]
    assert len(steps.calls) - 2 == request_steps(2)


def test_a_failed_request_still_ends_its_progress(faceless_restorer, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    steps = RecordedSteps()
    with pytest.raises(CodeFormerError, match=r"images\[0\] \(corrupt.jpg\)"):
        restore_request(faceless_restorer, [corrupt], RequestOptions(), local_root=None, progress=steps)
    assert steps.calls == [f"begin {request_steps(1)}", "images[0] (corrupt.jpg): read", "end"]


def test_the_terminal_bar_names_the_running_step_and_counts_them_all() -> None:
    stream = TerminalStream()
    bar = TerminalProgress(stream)
    bar.begin(3)
    for name in ("first step", "second step", "third step"):
        bar.step(name)
    bar.end()
    shown = stream.getvalue()
    assert "second step" in shown and "third step: 100%" in shown
    assert "3/3" in shown and "4/3" not in shown


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_the_command_line_shows_a_bar_only_on_a_terminal(
    terminal: bool,
    faceless_weights_dir: Path,
    two_photos: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stderr = TerminalStream() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    out = tmp_path / "out"
    args = [*map(str, two_photos), "--output-dir", str(out), "--weights-dir", str(faceless_weights_dir)]
    with caplog.at_level(logging.INFO, logger="codeformer"):
        assert main([*args, "--device", "cpu"]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["canvas.jpg", "face.jpg"]
    bar = "images[1] (canvas.png): encode: 100%"
    assert (bar in stderr.getvalue()) is terminal
    # the log lines are kept either way
    assert any(
        "-> " in record.getMessage() and "face.jpg" in record.getMessage() for record in caplog.records
    )
