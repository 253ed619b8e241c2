"""The three networks as pure ``nn.Module``s, in the official configuration.

Constructors describe the architecture only: no downloads, no device moves. Each class
is imported on first use so that importing one net does not build the others' modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codeformer.nets.codeformer import CodeFormer
    from codeformer.nets.parsenet import ParseNet
    from codeformer.nets.retinaface import RetinaFace

__all__ = ["CodeFormer", "ParseNet", "RetinaFace"]
_MODULES = {"CodeFormer": "codeformer", "ParseNet": "parsenet", "RetinaFace": "retinaface"}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(f"codeformer.nets.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'codeformer.nets' has no attribute {name!r}")
