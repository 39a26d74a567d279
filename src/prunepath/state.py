"""What PrunePath knows about a model, in one object: :class:`PrunePathState`, kept as ``model.prunepath``.

Earlier versions patched loose attributes onto the Hugging Face model (``prunepath_config``,
``prunepath_display_name``, ``prunepath_source``, ``prunepath_tokenizer``, ``prunepath_static_sparsity``,
``prunepath_static_method``, ``prunepath_activation``, ``_prunepath_engines``); they all live here now. None of it
is saved by ``save_pretrained``: checkpoints carry these facts in their own files, and the loaders set them again,
so the on-disk format is unchanged. Imports nothing of the package (a foundation module: ``models`` sets the
source and tokenizer, ``conversion`` the config, ``baselines`` the static / activation sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ATTR = "prunepath"  # the attribute name on the model


@dataclass(eq=False)
class PrunePathState:
    """Everything PrunePath attaches to a model. The types named in comments live in higher packages."""

    config: Any = None  # conversion.PrunePathConfig: set on a converted model (expert layout + routing settings)
    display_name: str | None = None  # a readable model name for reports
    source: str | None = None  # what it was loaded from (built-in name, path or Hub id)
    tokenizer: Any = None  # the tokenizer loaded with it (save() writes it beside the weights)
    static_sparsity: float | None = None  # Wanda / static pruning: the achieved weight sparsity, reported as s_FFN
    static_method: str | None = None  # e.g. "wanda-ffn"
    activation: Any = None  # baselines.activation.ActivationSpec of a TEAL / CATS model
    engines: dict | None = field(default=None, repr=False)  # decoding: engines tied to these weights


def state_of(model: Any) -> PrunePathState:
    """The model's :class:`PrunePathState`, attached (empty) on first use."""
    st = getattr(model, ATTR, None)
    if not isinstance(st, PrunePathState):
        st = PrunePathState()
        setattr(model, ATTR, st)
    return st
