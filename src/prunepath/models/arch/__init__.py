"""Per-architecture facts, one module per family: ``llama.py`` (Llama / Mistral / Qwen2 / SmolLM) and ``gpt2.py``.

Each family module gives the decode weight view (:class:`DecodeView`: embeddings, norms, attention and positional
tensors per layer, as the model holds them) that :class:`prunepath.decoding.engine.DecodeEngine` consumes with no
architecture ``if`` of its own. The FFN sites of every architecture stay in :mod:`prunepath.models.adapters`
(the adapters), which Wanda's targets and the decode engine's dense path also use.
"""

from __future__ import annotations

from torch import nn

from prunepath.errors import PrunePathError
from prunepath.models.arch import gpt2, llama
from prunepath.models.arch.view import DecodeView, LayerView

DECODE_VIEWS = {"llama": llama.decode_view, "mistral": llama.decode_view, "qwen2": llama.decode_view,
                "gpt2": gpt2.decode_view}
DECODE_MODEL_TYPES = tuple(DECODE_VIEWS)  # the model types the decode engine runs

__all__ = ["DECODE_MODEL_TYPES", "DECODE_VIEWS", "DecodeView", "LayerView", "decode_view"]


def decode_view(model: nn.Module, max_len: int) -> DecodeView:
    """The decode weight view of ``model`` (its own tensors, no copies) for a cache of ``max_len`` positions."""
    mt = getattr(model.config, "model_type", None)
    if mt not in DECODE_VIEWS:
        raise PrunePathError(f"the decode engine supports {', '.join(DECODE_MODEL_TYPES)} models, not {mt!r}; "
                             "use the PyTorch path (--kernels torch)")
    return DECODE_VIEWS[mt](model, max_len)
