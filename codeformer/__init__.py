"""CodeFormer face restoration: detect -> align -> restore -> paste back.

``Restorer`` is imported lazily so that light entry points (``python -m
codeformer.weights fetch``, the schema writer) do not pay for OpenCV and the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codeformer.pipeline import Restorer

__all__ = ["Restorer"]


def __getattr__(name: str):
    if name == "Restorer":
        from codeformer.pipeline import Restorer

        return Restorer
    raise AttributeError(f"module 'codeformer' has no attribute {name!r}")
