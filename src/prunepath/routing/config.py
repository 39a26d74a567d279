"""Routing settings: what the router does at run time (changeable on a converted model without retraining)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from prunepath.errors import PrunePathError
from prunepath.models.adapters import ffn_byte_weights

RULES = ("cumulative", "nucleus", "topk", "all")

TAU_ALL = 1.05
"""The dense τ: the cumulative mass never reaches a τ > 1, so every expert runs. 1.05 is the paper's warm-up value
and the default everywhere a "dense" τ is meant (stage 1, dense layers, the first point of a sweep)."""

TAU_SWEEP_MAX = 2.0  # the largest τ a sweep or ``--taus`` accepts


def is_valid_tau(tau, upper: float | None = None, *, open_upper: bool = False) -> bool:
    """τ > 0, and ≤ ``upper`` (< ``upper`` when ``open_upper``) where a caller bounds it; NaN is never valid."""
    try:
        t = float(tau)
    except (TypeError, ValueError):
        return False
    if not t > 0:
        return False
    return upper is None or (t < upper if open_upper else t <= upper)


def validate_tau(tau, upper: float | None = None, *, open_upper: bool = False, message: str | None = None) -> float:
    """The one τ check (every site that accepts a τ calls it): raise :class:`PrunePathError` (``message``, or one
    naming the range) unless :func:`is_valid_tau`; returns τ as a float."""
    if not is_valid_tau(tau, upper, open_upper=open_upper):
        if message is None:
            rng = "> 0" if upper is None else f"in (0, {upper}{')' if open_upper else ']'}"
            message = f"tau must be {rng} (got {tau})"
        raise PrunePathError(message)
    return float(tau)


def validate_rule(rule: str, tau: float | None, k: int | None) -> None:
    """Raise a clear error for an unknown rule or an out-of-range τ / k."""
    if rule not in RULES:
        raise PrunePathError(f"unknown routing rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule in ("cumulative", "nucleus"):
        if tau is None:
            raise PrunePathError(f"rule {rule!r} needs tau (e.g. tau=0.9; tau > 1 keeps every expert)")
        validate_tau(tau, message=f"tau must be > 0 (got {tau}); use e.g. 0.5 for sparse, {TAU_ALL} for all experts")
    if rule == "topk":
        if k is None or int(k) < 1:
            raise PrunePathError(f"rule 'topk' needs k >= 1 (got {k})")




def validate_sparsity_fraction(value, what: str = "target sparsity") -> float:
    """A fraction of bytes or entries to skip: a float in (0, 1), or a PrunePathError naming the fix."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = float("nan")
    if not 0.0 < s < 1.0:
        raise PrunePathError(f"{what} must be in (0, 1) (got {value}); e.g. 0.4 skips 40 %")
    return s


INNER_CAP = 0.95  # no in-expert tensor is thresholded above this fraction by a split


def validate_mid_bias(value, what: str = "the in-expert mid bias") -> float:
    """κ of :func:`inner_split`: a float in [0, 1), or a PrunePathError naming the range."""
    try:
        k = float(value)
    except (TypeError, ValueError):
        k = float("nan")
    if not 0.0 <= k < 1.0:
        raise PrunePathError(f"{what} must be in [0, 1) (got {value}); 0 thresholds x and h alike, larger values "
                             "move the in-expert fraction from the FFN input to the intermediate")
    return k


def inner_split(fraction: float, mid_bias: float, gated: bool) -> tuple[float, float]:
    """(f_in, f_mid): a byte-level in-expert fraction shifted towards the intermediate, which costs less quality
    per byte (measured on SmolLM2, docs/study.md "Round 7"). f_in = f·(1 − κ) and f_mid rises by what keeps the
    bytes at f (gated: f·(1 + 2κ)), f_mid capped at :data:`INNER_CAP`; κ = ``mid_bias`` in [0, 1), 0 gives f, f."""
    f, k = float(fraction), validate_mid_bias(mid_bias)
    w_in, w_mid = ffn_byte_weights(gated)
    f_mid = f + (w_in / w_mid) * f * k
    if f_mid <= INNER_CAP:
        return f * (1.0 - k), f_mid
    return max(0.0, (f - w_mid * INNER_CAP) / w_in), INNER_CAP


def validate_inner(inner: dict | None) -> dict:
    """Check a :attr:`RoutingConfig.inner` mapping (thresholds per layer, >= 0 or None); returns a copy."""
    if not inner:
        return {}
    try:
        t_in = [None if t is None else float(t) for t in inner["t_in"]]
        t_mid = [None if t is None else float(t) for t in inner["t_mid"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PrunePathError(f"routing inner thresholds need t_in and t_mid lists of numbers or None ({exc}); "
                             "calibrate them with prunepath.evaluation.inner (collect_inner_stats, inner_spec) or "
                             "prunepath eval --inner-sparsity") from exc
    if len(t_in) != len(t_mid) or any(t is not None and not t >= 0 for t in t_in + t_mid):
        raise PrunePathError(f"routing inner thresholds: {len(t_in)} t_in and {len(t_mid)} t_mid, all must be >= 0 "
                             "and one per layer; calibrate them again on this model")
    out = {**inner, "t_in": t_in, "t_mid": t_mid}
    if "target" in out:
        out["target"] = validate_sparsity_fraction(out["target"], "inner target sparsity")
    return out


@dataclass
class RoutingConfig:
    """How each PrunePath FFN picks and scales its experts.

    tau: probability budget of the cumulative rule (> 1 keeps every expert; the paper's warm-up uses TAU_ALL).
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
    inner: in-expert activation sparsity (beyond the paper; :func:`validate_inner`): inside the active experts,
        FFN-input entries with |x_j| <= t_in[layer] and intermediate entries with |h_i| <= t_mid[layer] are
        zeroed, TEAL-style. Keys ``target`` (the calibrated fraction), ``t_in``, ``t_mid`` (one entry per layer,
        None for no masking) and ``calibration`` (provenance); {} means off.
    """

    tau: float = TAU_ALL
    rule: str = "cumulative"
    k: int | None = None
    gates: bool = True
    gate_offset: float = 0.0
    layer_tau: dict[int, float] = field(default_factory=dict)
    method: str = "prunepath"
    params: dict = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)
    inner: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_tau = {int(i): float(t) for i, t in (self.layer_tau or {}).items()}
        self.allocation = dict(self.allocation or {})
        self.inner = validate_inner(self.inner)
        self.validate()

    def validate(self) -> None:
        if self.method == "prunepath":
            validate_rule(self.rule, self.tau, self.k)
        else:
            validate_tau(self.tau)
        for layer, t in self.layer_tau.items():
            validate_tau(t, message=f"layer_tau[{layer}] must be > 0 (got {t})")

    def copy(self) -> "RoutingConfig":
        """An independent copy (its dicts are copied too): e.g. the decode engine's own settings."""
        return replace(self, layer_tau=dict(self.layer_tau), params=dict(self.params), allocation=dict(self.allocation),
                       inner=dict(self.inner))

    def tau_for(self, layer_index: int) -> float:
        return self.layer_tau.get(layer_index, self.tau)

    def every_expert(self, layer_index: int) -> bool:
        """Whether the rule keeps every expert of this layer whatever the router says (rule "all", or a
        cumulative / nucleus τ > 1); with ``gates`` off the router then need not run."""
        return self.rule == "all" or (self.rule in ("cumulative", "nucleus") and self.tau_for(layer_index) > 1.0)

    def router_needed(self, layer_index: int) -> bool:
        """Whether a token reads this layer's router: always, unless every expert runs unscaled."""
        return self.method != "prunepath" or self.gates or not self.every_expert(layer_index)

    def inner_for(self, layer_index: int) -> tuple[float | None, float | None]:
        """(t_in, t_mid) of the in-expert activation thresholds of one layer; (None, None) when off."""
        if not self.inner:
            return None, None
        return self.inner["t_in"][layer_index], self.inner["t_mid"][layer_index]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_tau"] = {str(i): t for i, t in self.layer_tau.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
