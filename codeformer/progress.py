"""A request's steps as they start, for a person waiting at a terminal.

``restore_request`` announces ``4 * images + 1`` steps: per image its read, its face
detection, its paste-back and its encode, and one CodeFormer pass over all the request's
faces. The server and programs pass nothing (``Progress``, which shows nothing: their
record is the log and the prediction's figures); ``python -m codeformer`` on a terminal
shows ``TerminalProgress``, a tqdm bar whose label names the step running now;
``predict.py`` keeps ``StepReached``, the step a failed request had started last.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from tqdm import tqdm


def request_steps(images: int) -> int:
    """How many steps ``restore_request`` announces for a request of ``images`` images."""
    return 4 * images + 1


class Progress:
    """Receives the steps of a request; this base shows nothing."""

    def begin(self, steps: int) -> None:
        """A request of ``steps`` steps starts."""

    def step(self, name: str) -> None:
        """Step ``name`` starts; the one before it is done."""

    def end(self) -> None:
        """The request's last step is done (also after a failure)."""


class StepReached(Progress):
    """Remembers the name of the step that started last: where a failed request stopped."""

    def __init__(self) -> None:
        self.name: str | None = None

    def step(self, name: str) -> None:
        self.name = name


class TerminalProgress(Progress):
    """One tqdm bar per request on ``stream``: steps done of all, and the step running now."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: tqdm | None = None

    def begin(self, steps: int) -> None:
        # the terminal's size, or 80 x 24 where it reports none (a pseudo-terminal without a
        # size, where tqdm would otherwise hide the bar)
        size = shutil.get_terminal_size()
        self.bar = tqdm(
            total=steps, file=self.stream, unit="step", ncols=size.columns, nrows=size.lines, leave=True
        )

    def step(self, name: str) -> None:
        if self.bar is None:
            return
        if self.bar.desc:  # a step was running: it is done
            self.bar.update(1)
        self.bar.set_description_str(name)

    def end(self) -> None:
        if self.bar is None:
            return
        if self.bar.desc and self.bar.n < self.bar.total:
            self.bar.update(1)
        self.bar.close()
        self.bar = None
