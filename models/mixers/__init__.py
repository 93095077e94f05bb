"""Token mixers: one module per architecture, all built as ``Mixer(config, layer_idx)`` with ``forward(x) -> x``."""

from models.mixers.hgrn2 import HGRN2
from models.mixers.lightning import Lightning
from models.mixers.mamba2 import Mamba2
from models.mixers.softmax import Softmax

__all__ = ["HGRN2", "Lightning", "Mamba2", "Softmax"]
