"""A PrunePath checkpoint for plain `transformers` (written by prunepath.save as ``prunepath_hf.py``).

This file is self-contained: it needs only torch and transformers, not prunepath. Load the checkpoint with::

    AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, trust_remote_code=True)

(``AutoModelForSequenceClassification`` / ``AutoModel`` for checkpoints of those heads; ``config.json``'s
``auto_map`` names the right one). It builds the base architecture named in ``BASE_CLASS`` and replaces every
gated FFN (``mlp.gate_proj/up_proj/down_proj/act_fn``) with :class:`PrunePathMLP`, which routes tokens exactly
as prunepath does: experts ranked by the softmax of the router logits (ties to the lower index), rank 0 and
every expert whose inclusive cumulative probability is strictly below tau kept (tau > 1 keeps all), each kept
expert scaled by sigmoid(logit + gate_offset), always-on experts always kept and outside the budget.

The routing settings come from ``config.prunepath["routing"]`` and can be changed at run time through the
model's ``prunepath_routing`` dict, e.g. ``model.prunepath_routing["tau"] = 0.7``; the fraction of inactive
experts of the last forward is ``model.prunepath_sparsity()``.

The file is kept in the prunepath sources (prunepath/hf_remote.py); prunepath.save copies it with BASE_CLASS
set to the saved model's class.
"""

import torch
import transformers
from torch import nn

BASE_CLASS = 'LlamaForCausalLM'
FORMAT_VERSION = 1  # the newest config.prunepath format this file reads
RULES = ("cumulative", "nucleus", "topk", "all")


def select_experts(probs, tau, rule="cumulative", k=None):
    """Boolean mask of the selected experts over the last dimension (prunepath.select_experts)."""
    num_experts = probs.shape[-1]
    if rule == "all":
        return torch.ones_like(probs, dtype=torch.bool)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    if rule == "topk":
        keep_sorted = (torch.arange(num_experts, device=probs.device) < int(k)).expand_as(probs)
    else:
        sorted_p = torch.gather(probs.float(), -1, order)
        cum = torch.cumsum(sorted_p, dim=-1)
        if rule == "nucleus":
            cum = cum - sorted_p
        keep_sorted = cum < torch.as_tensor(tau, dtype=torch.float32, device=probs.device)
        keep_sorted[..., 0] = True
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    return mask.scatter(-1, order, keep_sorted)


class PrunePathMLP(nn.Module):
    """A gated FFN split into contiguous experts of ``neurons_per_expert`` neurons, plus a linear router."""

    def __init__(self, hidden_size, num_experts, neurons_per_expert, act_fn, routing, layer_index,
                 bias_in=False, bias_out=False, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        d_ff = num_experts * neurons_per_expert
        self.num_experts, self.neurons_per_expert, self.layer_index = num_experts, neurons_per_expert, layer_index
        self.gate_proj = nn.Linear(hidden_size, d_ff, bias=bias_in, **kw)
        self.up_proj = nn.Linear(hidden_size, d_ff, bias=bias_in, **kw)
        self.down_proj = nn.Linear(d_ff, hidden_size, bias=bias_out, **kw)
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.act_fn = act_fn
        self.register_buffer("neuron_index", torch.arange(d_ff, device=device), persistent=True)
        self.register_buffer("always_on", torch.zeros(num_experts, dtype=torch.bool, device=device),
                             persistent=True)
        self.routing = routing  # one dict shared by every layer of the model
        self.last_active = None

    def forward(self, x):
        r = self.routing
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        if r["gates"] or r["rule"] != "all":
            logits = self.router(x).float()
            tau = r["layer_tau"].get(self.layer_index, r["tau"])
            if r["rule"] == "all" or (r["rule"] in ("cumulative", "nucleus") and tau > 1.0):
                mask = torch.ones_like(logits, dtype=torch.bool)
            else:
                sel = logits
                if bool(self.always_on.any()):
                    sel = logits.masked_fill(self.always_on, float("-inf"))
                mask = select_experts(torch.softmax(sel, dim=-1), tau, r["rule"], r.get("k")) | self.always_on
            if r["gates"]:
                weights = torch.sigmoid(logits + r["gate_offset"]) * mask
            else:
                weights = mask.to(logits.dtype)
            lead = h.shape[:-1]
            h = (h.view(*lead, self.num_experts, self.neurons_per_expert)
                 * weights.to(h.dtype).unsqueeze(-1)).view(*lead, -1)
            self.last_active = mask.sum(-1).detach()
        else:
            self.last_active = torch.full(x.shape[:-1], self.num_experts, device=x.device)
        return self.down_proj(h)


def _routing_from_config(config):
    pp = getattr(config, "prunepath", None)
    if not isinstance(pp, dict) or "routing" not in pp:
        raise ValueError("config.json has no 'prunepath' entry: this is not a PrunePath checkpoint saved with "
                         "plain-transformers support; re-save it with a current prunepath (prunepath.save)")
    if int(pp.get("format_version", 1)) > FORMAT_VERSION:
        raise ValueError(f"this checkpoint uses PrunePath format {pp.get('format_version')}, newer than this "
                         f"prunepath_hf.py reads ({FORMAT_VERSION}); re-save it with the prunepath that wrote it")
    routing = dict(pp["routing"])
    method = routing.get("method", "prunepath")
    if method != "prunepath" or routing.get("rule", "cumulative") not in RULES:
        raise ValueError(f"routing method {method!r} / rule {routing.get('rule')!r} is not supported outside "
                         "prunepath; load this checkpoint with prunepath.load")
    routing["layer_tau"] = {int(i): float(t) for i, t in (routing.get("layer_tau") or {}).items()}
    return pp, routing


def _ffn_owners(model):
    """Modules holding a gated FFN as ``.mlp``, in layer order (prunepath's gated-mlp adapter)."""
    return [m for m in model.modules()
            if getattr(m, "mlp", None) is not None
            and all(hasattr(m.mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]


def install_prunepath(model, config):
    """Replace every gated FFN of ``model`` by a PrunePathMLP (weights to be loaded from the checkpoint)."""
    pp, routing = _routing_from_config(config)
    owners = _ffn_owners(model)
    if len(owners) != int(pp["num_layers"]):
        raise ValueError(f"the checkpoint has {pp['num_layers']} PrunePath FFNs but {BASE_CLASS} built "
                         f"{len(owners)}; config.json and the weights disagree")
    for i, owner in enumerate(owners):
        old = owner.mlp
        ref = old.up_proj.weight
        owner.mlp = PrunePathMLP(
            ref.shape[1], int(pp["num_experts"]), int(pp["neurons_per_expert"]), old.act_fn, routing, i,
            bias_in=old.gate_proj.bias is not None or old.up_proj.bias is not None,
            bias_out=old.down_proj.bias is not None, dtype=ref.dtype, device=ref.device)
    model.prunepath_routing = routing
    return model


_Base = getattr(transformers, BASE_CLASS)


class PrunePathModel(_Base):
    """``BASE_CLASS`` with PrunePath FFNs (routing settings in ``self.prunepath_routing``)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        install_prunepath(self, config)

    def prunepath_sparsity(self):
        """s_FFN of the last forward: the fraction of (token, expert) pairs that were not computed."""
        layers = [m for m in self.modules() if isinstance(m, PrunePathMLP) and m.last_active is not None]
        if not layers:
            return 0.0
        active = sum(float(m.last_active.float().mean()) for m in layers) / len(layers)
        return 1.0 - active / layers[0].num_experts
