"""Per-architecture facts, one module per family: ``llama.py`` (Llama / Mistral / Qwen2 / SmolLM, and the FFN of
every gated-MLP model), ``gpt2.py``, ``bert.py`` and ``opt.py``.

Each family module names the FFN's linear layers that Wanda prunes (``FFN_LINEARS``, looked up by the adapter's
name with :func:`ffn_linears`); the decoder families also give the decode weight view (:class:`DecodeView`:
embeddings, norms, attention and positional tensors per layer, as the model holds them) that
:class:`prunepath.decoding.engine.DecodeEngine` consumes with no architecture ``if`` of its own. The FFN sites of
every architecture stay in :mod:`prunepath.models.adapters` (the adapters), which Wanda's targets and the decode
engine's dense path also use.
"""

from __future__ import annotations

from torch import nn

from prunepath.errors import PrunePathError
from prunepath.models.arch import bert, gpt2, llama, opt
from prunepath.models.arch.view import DecodeView, LayerView

DECODE_VIEWS = {"llama": llama.decode_view, "mistral": llama.decode_view, "qwen2": llama.decode_view,
                "gpt2": gpt2.decode_view}
DECODE_MODEL_TYPES = tuple(DECODE_VIEWS)  # the model types the decode engine runs
# adapter name (prunepath.models.adapters) → the FFN's linear layers under a site's owner, for Wanda
FFN_LINEARS = {"gated-mlp": llama.FFN_LINEARS, "gpt2": gpt2.FFN_LINEARS, "bert": bert.FFN_LINEARS,
               "opt": opt.FFN_LINEARS}

__all__ = ["DECODE_MODEL_TYPES", "DECODE_VIEWS", "FFN_LINEARS", "DecodeView", "LayerView", "decode_view",
           "ffn_linears", "max_positions"]


def max_positions(config) -> int | None:
    """The most positions the model was built for (GPT-2's ``n_positions``, else ``max_position_embeddings``), or
    None when the config names neither."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def ffn_linears(adapter_name: str) -> tuple[str, ...]:
    """The submodule paths of the FFN's linear layers under an FFN site's owner, for the adapter ``adapter_name``."""
    return FFN_LINEARS[adapter_name]


def decode_view(model: nn.Module, max_len: int) -> DecodeView:
    """The decode weight view of ``model`` (its own tensors, no copies) for a cache of ``max_len`` positions."""
    mt = getattr(model.config, "model_type", None)
    if mt not in DECODE_VIEWS:
        raise PrunePathError(f"the decode engine supports {', '.join(DECODE_MODEL_TYPES)} models, not {mt!r}; "
                             "use the PyTorch path (--kernels torch)")
    return DECODE_VIEWS[mt](model, max_len)
