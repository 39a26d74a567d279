"""Routing settings: what the router does at run time (changeable on a converted model without retraining)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from prunepath.errors import PrunePathError
from prunepath.routing.selection import validate_rule


@dataclass
class RoutingConfig:
    """How each PrunePath FFN picks and scales its experts.

    tau: probability budget of the cumulative rule (> 1 keeps every expert; the paper's warm-up uses 1.05).
    rule: "cumulative" (the paper), "nucleus" (keep the crossing expert), "topk" (k experts), "all".
    k: expert count for rule "topk".
    gates: scale each selected expert by sigmoid(logit + gate_offset); False gives the unscaled sum.
    gate_offset: added to the logit inside the sigmoid only (softmax is shift-invariant, so selection is
        unchanged); the paper's zero-initialised router starts every gate at sigmoid(0) = 0.5, an offset of
        e.g. 4 starts them near 1.
    layer_tau: optional per-layer τ overrides {layer_index: tau}; a τ > 1 keeps that layer dense.
    method: the routing method ("prunepath", or a baseline registered in prunepath.routing.methods).
    params: method-specific settings (e.g. LTE's threshold δ), JSON-serialisable.
    allocation: provenance of a calibrated ``layer_tau`` (prunepath.evaluation.allocation): target s_FFN, method,
        achieved s_FFN and calibration tokens; empty when ``layer_tau`` was set by hand. Checkpoints without it
        load with {}.
    """

    tau: float = 1.05
    rule: str = "cumulative"
    k: int | None = None
    gates: bool = True
    gate_offset: float = 0.0
    layer_tau: dict[int, float] = field(default_factory=dict)
    method: str = "prunepath"
    params: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_tau = {int(i): float(t) for i, t in (self.layer_tau or {}).items()}
        self.allocation = dict(self.allocation or {})
        self.validate()

    def validate(self) -> None:
        if self.method == "prunepath":
            validate_rule(self.rule, self.tau, self.k)
        elif not self.tau > 0:
            raise PrunePathError(f"tau must be > 0 (got {self.tau})")
        for layer, t in self.layer_tau.items():
            if not t > 0:
                raise PrunePathError(f"layer_tau[{layer}] must be > 0 (got {t})")

    def tau_for(self, layer_index: int) -> float:
        return self.layer_tau.get(layer_index, self.tau)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_tau"] = {str(i): t for i, t in self.layer_tau.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
