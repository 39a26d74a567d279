"""MoEfication: replace every FFN of a Hugging Face model by a :class:`PrunePathFFN` with contiguous experts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.conversion.clustering import cluster_neurons, resolve_expert_count
from prunepath.errors import PrunePathError
from prunepath.models.adapters import Adapter, DenseFFN, adapter_by_name, adapter_for
from prunepath.routing.config import RoutingConfig
from prunepath.routing.ffn import PrunePathFFN, is_converted, prunepath_modules  # noqa: F401  (re-exported)
from prunepath.state import state_of


@dataclass
class PrunePathConfig:
    """What a converted model carries (saved as ``prunepath_config.json`` beside the HF config)."""

    adapter: str
    num_experts: int
    neurons_per_expert: int
    num_layers: int
    clustering: str = "kmeans"
    seed: int = 0
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    router: str = "linear"
    router_kwargs: dict = field(default_factory=dict)
    source_model: str | None = None
    format_version: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["routing"] = self.routing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePathConfig":
        d = dict(d)
        d["routing"] = RoutingConfig.from_dict(d.get("routing", {}))
        return cls(**d)


def build_ffn(
    dense: DenseFFN,
    num_experts: int,
    neurons_per_expert: int,
    permutation: torch.Tensor,
    layer_index: int,
    routing: RoutingConfig,
    router: str = "linear",
    router_kwargs: dict | None = None,
) -> PrunePathFFN:
    """A PrunePathFFN holding ``dense``'s weights with neurons reordered by ``permutation``."""
    ref = dense.up_w
    ffn = PrunePathFFN(
        dense.hidden_size, num_experts, neurons_per_expert, gated=dense.gated, activation=dense.activation,
        bias_in=dense.up_b is not None or dense.gate_b is not None, bias_out=dense.down_b is not None,
        dropout=dense.dropout, layer_index=layer_index, routing=routing, router=router, router_kwargs=router_kwargs,
        dtype=ref.dtype, device=ref.device,
    )
    perm = permutation.to(ref.device)
    with torch.no_grad():
        if dense.gated:
            ffn.gate_proj.weight.copy_(dense.gate_w[perm])
            if ffn.gate_proj.bias is not None:
                ffn.gate_proj.bias.copy_(dense.gate_b[perm] if dense.gate_b is not None else 0)
        ffn.up_proj.weight.copy_(dense.up_w[perm])
        if ffn.up_proj.bias is not None:
            ffn.up_proj.bias.copy_(dense.up_b[perm] if dense.up_b is not None else 0)
        ffn.down_proj.weight.copy_(dense.down_w[:, perm])
        if ffn.down_proj.bias is not None:
            ffn.down_proj.bias.copy_(dense.down_b)
        ffn.neuron_index.copy_(perm)
    return ffn


def moefy(
    model: nn.Module,
    neurons_per_expert: int | None = 32,
    num_experts: int | None = None,
    seed: int = 0,
    *,
    clustering: str = "kmeans",
    routing: RoutingConfig | None = None,
    progress: bool = True,
    calibration_activations: list[torch.Tensor] | None = None,
    permutations: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Convert every FFN of ``model`` (in place) into PrunePath experts and return the model.

    Experts come from balanced k-means of the L2-normalised W_gate (gated) / W_1 (plain) rows, ``seed`` makes
    it deterministic. The router is zero-initialised; routing starts at τ = ``TAU_ALL`` (all experts, sigmoid gates).
    ``clustering="coactivation"`` needs ``calibration_activations`` (one [tokens, d_ff] tensor per layer).
    ``permutations`` (one neuron order per layer, e.g. clustered from *another* model's weights) replaces the
    clustering; ``clustering`` is then only the label stored in the config.
    """
    if is_converted(model):
        raise PrunePathError("this model is already converted; load the original model to convert it again")
    adapter = adapter_for(model)
    sites = adapter.sites(model)
    if not sites:
        raise PrunePathError(f"no FFN found in this {adapter.name} model; is it a supported architecture?")
    if permutations is not None and len(permutations) != len(sites):
        raise PrunePathError(f"{len(permutations)} permutations for {len(sites)} FFN layers")
    routing = routing if routing is not None else RoutingConfig()
    first = adapter.extract(sites[0])
    num_experts, neurons_per_expert = resolve_expert_count(first.intermediate_size, neurons_per_expert, num_experts)
    for i, site in enumerate(tqdm(sites, desc="converting FFNs", disable=not progress, unit="layer")):
        dense = adapter.extract(site)
        e, n = resolve_expert_count(dense.intermediate_size, None, num_experts)
        if n != neurons_per_expert:
            raise PrunePathError("FFN widths differ across layers; pass num_experts that divides every width")
        if permutations is not None:
            perm = permutations[i]
            if sorted(perm.tolist()) != list(range(dense.intermediate_size)):
                raise PrunePathError(f"layer {site.layer_index}: not a permutation of {dense.intermediate_size} "
                                     "neurons")
        else:
            acts = calibration_activations[site.layer_index] if calibration_activations is not None else None
            perm = cluster_neurons(dense.cluster_rows, e, method=clustering, seed=seed, activations=acts)
        adapter.install(site, build_ffn(dense, e, n, perm, site.layer_index, routing))
    state_of(model).config = PrunePathConfig(
        adapter=adapter.name, num_experts=num_experts, neurons_per_expert=neurons_per_expert,
        num_layers=len(sites), clustering=clustering, seed=seed, routing=routing,
        source_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    return model


def install_structure(model: nn.Module, config: PrunePathConfig) -> nn.Module:
    """Give a freshly built dense model the converted structure of ``config`` (identity layout, to be filled
    by a state dict). Used when loading a checkpoint."""
    adapter: Adapter = adapter_by_name(config.adapter)
    sites = adapter.sites(model)
    if len(sites) != config.num_layers:
        raise PrunePathError(
            f"checkpoint expects {config.num_layers} FFN layers but the model has {len(sites)}; "
            "the checkpoint's config.json and prunepath_config.json disagree (a corrupt or mixed checkpoint?)")
    identity = torch.arange(config.num_experts * config.neurons_per_expert)
    for site in sites:
        dense = adapter.extract(site)
        adapter.install(site, build_ffn(dense, config.num_experts, config.neurons_per_expert, identity,
                                        site.layer_index, config.routing, config.router, config.router_kwargs))
    state_of(model).config = config
    return model
