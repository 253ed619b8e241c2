"""The project's exception types: one base class, one subclass per kind of failure.

Every message names what failed (an input, a file, a setting) and how to fix it.
"""

from __future__ import annotations


class CodeFormerError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(CodeFormerError):
    """A request input is invalid or cannot be decoded (the caller's fault)."""


class WeightsError(CodeFormerError):
    """A weight file is missing, cannot be downloaded, or does not load."""


class InternalError(CodeFormerError):
    """A stage got data of the wrong shape or type from another of our stages: a bug, not bad input."""


class ConfigError(CodeFormerError):
    """A runtime setting is unknown or conflicts with the running process."""


class ImageFailedError(CodeFormerError):
    """Processing one image of a request failed; ``index`` is its position in the request."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


class RequestCancelled(CodeFormerError):
    """The request was cancelled (its cancel flag was set) before its work finished."""
