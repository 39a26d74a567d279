"""Architecture adapters: the one place that knows where each model family keeps its FFN and how it is wired.

An adapter finds every FFN of a model ("sites"), reads its dense weights in one canonical form
(:class:`DenseFFN`), and installs a replacement module. Everything downstream (clustering, routing, kernels,
training) sees only the canonical form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from prunepath.errors import PrunePathError


def ffn_byte_weights(gated: bool) -> tuple[float, float]:
    """Shares of an FFN's weight bytes behind its input x (the W_gate and W_up columns, or W₁'s) and behind its
    intermediate h (the W_down rows, or W₂'s): a gated FFN has three equal matrices, a plain one two (biases
    ignored). Every byte-level s_FFN (TEAL, CATS, in-expert thresholds) weighs its two fractions with these."""
    return (2 / 3, 1 / 3) if gated else (1 / 2, 1 / 2)


@dataclass
class DenseFFN:
    """A dense FFN in canonical form. Weights are [out, in] like ``nn.Linear``.

    gated: y = (act(x W_gateᵀ) ⊙ x W_upᵀ) W_downᵀ ; plain: y = act(x W_upᵀ + b_up) W_downᵀ + b_down.
    """

    gate_w: torch.Tensor | None
    gate_b: torch.Tensor | None
    up_w: torch.Tensor
    up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    activation: nn.Module
    dropout: nn.Module | None = None

    @property
    def gated(self) -> bool:
        return self.gate_w is not None

    @property
    def intermediate_size(self) -> int:
        return self.up_w.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up_w.shape[1]

    @property
    def cluster_rows(self) -> torch.Tensor:
        """The per-neuron vectors clustered into experts: rows of W_gate (gated) or W_1 (plain)."""
        return self.gate_w if self.gated else self.up_w


@dataclass
class FFNSite:
    """Where one FFN lives: the module that owns it (a decoder/encoder layer or the MLP's parent)."""

    layer_index: int
    owner: nn.Module
    attr: str  # attribute of ``owner`` holding the FFN (or its first half)


class Adapter:
    """Base class: subclasses describe one family of architectures."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    def sites(self, model: nn.Module) -> list[FFNSite]:
        raise NotImplementedError

    def extract(self, site: FFNSite) -> DenseFFN:
        raise NotImplementedError

    def install(self, site: FFNSite, ffn: nn.Module) -> None:
        setattr(site.owner, site.attr, ffn)


def _owners_with(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> Iterator[nn.Module]:
    for module in model.modules():
        if predicate(module):
            yield module


class GatedMLPAdapter(Adapter):
    """Llama, Mistral, Qwen2/3, SmolLM, Gemma 1/2/3: ``mlp.{gate,up,down}_proj`` + ``act_fn``."""

    name = "gated-mlp"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "gemma3", "gemma3_text")

    def sites(self, model: nn.Module) -> list[FFNSite]:
        def is_owner(m: nn.Module) -> bool:
            mlp = getattr(m, "mlp", None)
            return mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        return [FFNSite(i, owner, "mlp") for i, owner in enumerate(_owners_with(model, is_owner))]

    def extract(self, site: FFNSite) -> DenseFFN:
        mlp = site.owner.mlp
        return DenseFFN(
            gate_w=mlp.gate_proj.weight.data,
            gate_b=mlp.gate_proj.bias.data if mlp.gate_proj.bias is not None else None,
            up_w=mlp.up_proj.weight.data,
            up_b=mlp.up_proj.bias.data if mlp.up_proj.bias is not None else None,
            down_w=mlp.down_proj.weight.data,
            down_b=mlp.down_proj.bias.data if mlp.down_proj.bias is not None else None,
            activation=mlp.act_fn,
        )


class GPT2Adapter(Adapter):
    """GPT-2: ``mlp.c_fc`` / ``mlp.c_proj`` are Conv1D (weight stored [in, out]), GELU, biases, dropout."""

    name = "gpt2"
    model_types = ("gpt2",)

    def sites(self, model: nn.Module) -> list[FFNSite]:
        def is_owner(m: nn.Module) -> bool:
            mlp = getattr(m, "mlp", None)
            return mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj")
        return [FFNSite(i, owner, "mlp") for i, owner in enumerate(_owners_with(model, is_owner))]

    def extract(self, site: FFNSite) -> DenseFFN:
        mlp = site.owner.mlp
        return DenseFFN(
            gate_w=None, gate_b=None, up_w=mlp.c_fc.weight.data.t(), up_b=mlp.c_fc.bias.data,
            down_w=mlp.c_proj.weight.data.t(), down_b=mlp.c_proj.bias.data,
            activation=mlp.act, dropout=mlp.dropout,
        )


class BertAdapter(Adapter):
    """BERT / RoBERTa: ``intermediate.dense`` + act, then ``output.dense``; the residual LayerNorm stays put.

    The PrunePath FFN replaces ``intermediate`` and computes the whole FFN; ``output.dense`` becomes identity.
    """

    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")

    def sites(self, model: nn.Module) -> list[FFNSite]:
        def is_owner(m: nn.Module) -> bool:
            inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
            return inter is not None and hasattr(inter, "dense") and out is not None and hasattr(out, "dense")
        return [FFNSite(i, owner, "intermediate") for i, owner in enumerate(_owners_with(model, is_owner))]

    def extract(self, site: FFNSite) -> DenseFFN:
        inter, out = site.owner.intermediate, site.owner.output
        return DenseFFN(
            gate_w=None, gate_b=None, up_w=inter.dense.weight.data, up_b=inter.dense.bias.data,
            down_w=out.dense.weight.data, down_b=out.dense.bias.data,
            activation=inter.intermediate_act_fn,
        )

    def install(self, site: FFNSite, ffn: nn.Module) -> None:
        site.owner.intermediate = ffn
        site.owner.output.dense = nn.Identity()


class OPTAdapter(Adapter):
    """OPT: ``fc1`` → ``activation_fn`` → ``fc2`` inline in the decoder layer (ReLU, biases)."""

    name = "opt"
    model_types = ("opt",)

    def sites(self, model: nn.Module) -> list[FFNSite]:
        def is_owner(m: nn.Module) -> bool:
            return all(hasattr(m, a) for a in ("fc1", "fc2", "activation_fn"))
        return [FFNSite(i, owner, "fc1") for i, owner in enumerate(_owners_with(model, is_owner))]

    def extract(self, site: FFNSite) -> DenseFFN:
        layer = site.owner
        return DenseFFN(
            gate_w=None, gate_b=None, up_w=layer.fc1.weight.data, up_b=layer.fc1.bias.data if layer.fc1.bias is not None else None,
            down_w=layer.fc2.weight.data, down_b=layer.fc2.bias.data if layer.fc2.bias is not None else None,
            activation=layer.activation_fn,
        )

    def install(self, site: FFNSite, ffn: nn.Module) -> None:
        site.owner.fc1 = ffn
        site.owner.activation_fn = nn.Identity()
        site.owner.fc2 = nn.Identity()


ADAPTERS: tuple[Adapter, ...] = (GatedMLPAdapter(), GPT2Adapter(), BertAdapter(), OPTAdapter())


# Model-type prefixes whose every sequence (evaluation window, training block) must start with BOS: without it
# Gemma's WikiText-2 PPL goes from 33.8 to 90.3. Like the FFN layouts above, an architecture fact kept here.
BOS_AT_EVERY_START = ("gemma",)


def needs_bos(model: nn.Module, tokenizer) -> bool:
    """Whether every window / block must start with BOS: the model type needs it, or the tokenizer adds one."""
    mtype = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    wants = mtype.startswith(BOS_AT_EVERY_START) or bool(getattr(tokenizer, "add_bos_token", False))
    if wants and getattr(tokenizer, "bos_token_id", None) is None:
        raise PrunePathError("this model needs a BOS token at every window start but the tokenizer has none; "
                             "pass the model's own tokenizer")
    return wants


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_by_name(name: str) -> Adapter:
    for a in ADAPTERS:
        if a.name == name:
            return a
    raise PrunePathError(f"unknown adapter {name!r}; known: {', '.join(a.name for a in ADAPTERS)}")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face model, chosen by ``config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    raise PrunePathError(
        f"unsupported architecture {model_type or type(model).__name__!r}. PrunePath supports model types: "
        f"{', '.join(supported_model_types())}. Other gated (gate/up/down) models can be added with an Adapter "
        f"in prunepath/models/adapters.py."
    )
