"""The project's exception types: one base class, one subclass per kind of failure.

Every message names what failed (an input, a file, a setting) and how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class CodeFormerError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(CodeFormerError):
    """A request input is invalid or cannot be decoded (the caller's fault)."""


@contextmanager
def labelled(label: str) -> Iterator[None]:
    """An ``InputError`` raised in the block, again, its message prefixed with ``label``.

    The one place an input's name joins the reason (``images[1] (x.jpg): not a readable
    image``): the steps that read, check and decode an input raise the reason alone.
    """
    try:
        yield
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None


class WeightsError(CodeFormerError):
    """A weight file is missing, cannot be downloaded, or does not load."""


class InternalError(CodeFormerError):
    """A stage got data of the wrong shape or type from another of our stages: a bug, not bad input."""


class ConfigError(CodeFormerError):
    """A runtime setting is unknown or conflicts with the running process."""


class ImageFailedError(CodeFormerError):
    """Processing images of a request failed; ``indices`` are their positions in the request.

    One image when its own step failed (decoding, detection, paste-back); several when a step
    they share failed (their faces restored in one forward ran out of device memory).
    ``index`` is the first of them.
    """

    def __init__(self, index: int | Sequence[int], reason: str) -> None:
        self.indices = (index,) if isinstance(index, int) else tuple(index)
        numbers = ", ".join(str(position) for position in self.indices)
        super().__init__(f"image{'s' if len(self.indices) > 1 else ''} {numbers}: {reason}")
        self.index = self.indices[0]
        self.reason = reason


class DeviceBrokenError(CodeFormerError):
    """The device failed in a way no later call can recover from (a sticky CUDA error).

    The process stops so that Cog starts a new worker (``codeformer.device_faults``); calls
    made meanwhile fail with this error at once.
    """


class ShuttingDownError(CodeFormerError):
    """A prediction arrived while its replica drains before a stop: send it to another replica."""


class RequestCancelled(CodeFormerError):
    """The request was cancelled (its cancel flag was set) before its work finished."""


# coglet 0.23 reports an async prediction as *canceled*, not failed, when the text of its
# exception contains "cancelled" or "CancelledError" (case-sensitive: coglet-python's
# worker_bridge.rs). Our messages quote what users chose (file names, URL paths, data URI
# names), so such text can come from a user. The "l" that completes either word is written
# "%6C" (its percent-encoding) in a failure's text: the name stays recognisable.
_COG_CANCEL_WORD = re.compile(r"(?<=[Cc]ancel)l(?=ed)")


def reported_as_failure(exc: Exception) -> Exception:
    """``exc``, or a copy of it whose text Cog cannot mistake for a cancel.

    The copy has the same class and attributes; only its message differs, and only where
    ``cancelled``/``Cancelled`` stood. A real cancel never reaches this: it is an
    ``asyncio.CancelledError``, which is not an ``Exception``.
    """
    text = str(exc)
    safe = _COG_CANCEL_WORD.sub("%6C", text)
    if safe == text:
        return exc
    copy = Exception.__new__(type(exc))
    copy.__dict__.update(exc.__dict__)
    copy.args = (safe,)
    return copy
