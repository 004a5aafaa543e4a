"""Activation functions by config name, without importing transformers.activations.

transformers.activations imports its hub-kernel integration, which pulls in torch.distributed.tensor,
torch.export and sympy: ~50 MB of resident memory for what is F.silu. The common names map to the
same torch functions transformers' ACT2FN calls; any other name falls back to ACT2FN.
"""

from __future__ import annotations

import torch.nn.functional as F

# The exact functions ACT2FN's modules call for these names (nn.SiLU, nn.ReLU, GELUActivation).
_NATIVE = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}


def activation(name: str):
    """The activation callable of a config's `hidden_act` (or similar) name."""
    if name in _NATIVE:
        return _NATIVE[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]
