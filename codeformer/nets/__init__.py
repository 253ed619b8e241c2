"""The three networks as pure ``nn.Module``s, in the official configuration.

Constructors describe the architecture only: no downloads, no device moves.
"""

from __future__ import annotations

from codeformer.nets.codeformer import CodeFormer
from codeformer.nets.parsenet import ParseNet
from codeformer.nets.retinaface import RetinaFace

__all__ = ["CodeFormer", "ParseNet", "RetinaFace"]
