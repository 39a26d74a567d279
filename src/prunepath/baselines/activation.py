"""Training-free activation sparsity on the original dense model: TEAL (Liu et al. 2024) and CATS (Lee et al. 2024).

Both zero small activations inside each FFN by per-layer magnitude thresholds calibrated on calibration text:

- TEAL: entries of the FFN input x with |x_j| < t_in are zeroed (their columns of W_gate / W_up are not read)
  and entries of the intermediate h = act(x W_gateᵀ) ⊙ (x W_upᵀ) (plain FFN: act(x W₁ᵀ + b₁)) with
  |h_i| < t_mid are zeroed (their rows of W_downᵀ are not read).
- CATS (gated FFNs only): neurons with |act(x W_gateᵀ)_i| < t_mid are zeroed; the gate is always read, the up and
  down rows of a zeroed neuron are not.

The FFN is computed densely with masks (quality measurement, no sparse kernels). Each wrapped FFN records the
fraction of FFN weight bytes every token did not read (:func:`prunepath.stats.activation_s_ffn`), which the
evaluators report as s_FFN.

    stats = collect_activation_stats(model, tok, calib_texts)     # one calibration pass, any target afterwards
    apply_activation_sparsity(model, teal_thresholds(stats, 0.4))  # or cats_thresholds(stats, 0.3)
    ...                                                            # evaluate; apply again with another spec
    remove_activation_sparsity(model)                              # the original modules, exactly
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunepath.errors import PrunePathError
from prunepath.models.adapters import Adapter, DenseFFN, FFNSite, adapter_by_name, adapter_for, ffn_byte_weights
from prunepath.state import state_of
from prunepath.stats import activation_modules as stats_activation_modules
from prunepath.stats import activation_s_ffn
from prunepath.checkpoint import atomic_replace_dir
from prunepath.baselines.activation_calibration import (  # noqa: F401  (re-exported)
    ActivationStats, _sample, _takes_cache, calibration_batches, collect_activation_stats)

METHODS = ("teal", "cats")
ALLOCATIONS = ("uniform", "greedy", "block")
SPEC_FILE = "prunepath_activation.json"
GREEDY_STEP = 0.05  # sparsity added to one (layer, tensor) per greedy step
GREEDY_MAX = 0.95  # no tensor of a layer is made sparser than this by the greedy allocation


# ---- targets and thresholds --------------------------------------------------------------------------------------

def check_target(method: str, sparsity: float, allocation: str = "uniform") -> None:
    """Raise a PrunePathError naming the fix for an unknown method / allocation or an unreachable target s_FFN."""
    if method not in METHODS:
        raise PrunePathError(f"unknown activation-sparsity method {method!r}; choose one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise PrunePathError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if method == "cats" and allocation != "uniform":
        raise PrunePathError("CATS has one threshold per layer and no greedy or block allocation; use "
                             "allocation='uniform'")
    s = float(sparsity)
    if not 0.0 < s < 1.0:
        raise PrunePathError(f"target sparsity must be in (0, 1) (got {sparsity}); e.g. 0.4 skips 40 % of the "
                             "FFN weight bytes per token")
    if method == "cats" and s >= 2 / 3:
        raise PrunePathError(f"CATS always reads the gate, so its s_FFN is at most 2/3 (neuron sparsity 1.5·s must be "
                             f"< 1); got {sparsity}; choose a target below 0.667")
    if method == "teal" and allocation != "uniform" and s > GREEDY_MAX:
        raise PrunePathError(f"{allocation} allocation reaches at most s_FFN {GREEDY_MAX} (got {sparsity}); use a "
                             "smaller target or allocation='uniform'")


@dataclass
class ActivationSparsity:
    """Per-layer magnitude thresholds of TEAL or CATS for one target s_FFN.

    An entry v is zeroed when |v| ≤ t (TEAL's rule; exact zeros, e.g. after ReLU, count as not read).
    ``t_in[l]`` applies to |x| (TEAL; None for CATS), ``t_mid[l]`` to |h| (TEAL) or |act(gate)| (CATS); None
    means no masking there. ``s_in`` / ``s_mid``: per-layer fractions at or below the thresholds on the
    calibration data (dense activations).
    """

    method: str
    target: float
    allocation: str
    t_in: list[float | None]
    t_mid: list[float | None]
    s_in: list[float] = field(default_factory=list)
    s_mid: list[float] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)  # tokens, source: for the record

    @property
    def num_layers(self) -> int:
        return len(self.t_mid)

    def label(self) -> str:
        alloc = f", {self.allocation}" if self.method == "teal" else ""
        return f"{self.method.upper()} (target s_FFN {self.target:g}{alloc})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationSparsity":
        try:
            spec = cls(method=str(d["method"]), target=float(d["target"]), allocation=str(d.get("allocation",
                       "uniform")), t_in=[_opt_float(t) for t in d["t_in"]], t_mid=[_opt_float(t) for t in d["t_mid"]],
                       s_in=[float(s) for s in d.get("s_in", [])], s_mid=[float(s) for s in d.get("s_mid", [])],
                       calibration=dict(d.get("calibration", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise PrunePathError(f"not an activation-sparsity spec ({exc}); expected the keys method, target, t_in, "
                                 f"t_mid as written by prunepath baseline --method teal|cats") from exc
        if spec.method not in METHODS or len(spec.t_in) != len(spec.t_mid):
            raise PrunePathError(f"bad activation-sparsity spec: method {spec.method!r}, {len(spec.t_in)} input and "
                                 f"{len(spec.t_mid)} intermediate thresholds")
        return spec


def _opt_float(t: Any) -> float | None:
    return None if t is None else float(t)


def quantile_threshold(sorted_abs: torch.Tensor, fraction: float) -> float | None:
    """The threshold t with ``fraction`` of the (ascending) samples at or below it; None (no masking) when that
    is no sample."""
    n = sorted_abs.numel()
    k = min(int(round(fraction * n)), n)
    return float(sorted_abs[k - 1]) if k > 0 else None


def _fraction_below(sorted_abs: torch.Tensor, t: float | None) -> float:
    """Fraction of the samples at or below ``t`` (what masking at ``t`` zeroes on the calibration data)."""
    if t is None or sorted_abs.numel() == 0:
        return 0.0
    pos = torch.searchsorted(sorted_abs, torch.tensor([t], dtype=sorted_abs.dtype), right=True)
    return float(pos.item()) / sorted_abs.numel()


def _spec(stats: ActivationStats, method: str, sparsity: float, allocation: str, s_in: Sequence[float],
          s_mid: Sequence[float]) -> ActivationSparsity:
    mid = stats.gate_abs if method == "cats" else stats.h_abs
    t_in = [quantile_threshold(stats.x_abs[i], s) for i, s in enumerate(s_in)]
    t_mid = [quantile_threshold(mid[i], s) for i, s in enumerate(s_mid)]
    return ActivationSparsity(method, float(sparsity), allocation, t_in, t_mid,
                              [_fraction_below(stats.x_abs[i], t) for i, t in enumerate(t_in)],
                              [_fraction_below(mid[i], t) for i, t in enumerate(t_mid)],
                              {"tokens": stats.tokens, "source": stats.source})


def teal_thresholds(stats: ActivationStats, sparsity: float, allocation: str = "uniform") -> ActivationSparsity:
    """TEAL thresholds for a target s_FFN (fraction of FFN weight bytes not read per token).

    ``uniform``: every layer has s_in = s_mid = ``sparsity``. ``block``: TEAL's own block-wise greedy, every
    layer at ``sparsity`` bytes, split between x and h by :func:`block_allocation`. ``greedy``: a greedy
    allocation across layers and tensors (:func:`greedy_allocation`). Both measure on the cached calibration inputs.
    """
    check_target("teal", sparsity, allocation)
    n = stats.num_layers
    if allocation == "uniform":
        return _spec(stats, "teal", sparsity, allocation, [float(sparsity)] * n, [float(sparsity)] * n)
    alloc = block_allocation if allocation == "block" else greedy_allocation
    s_in, s_mid = alloc(stats, float(sparsity))
    return _spec(stats, "teal", sparsity, allocation, s_in, s_mid)


def cats_thresholds(stats: ActivationStats, sparsity: float) -> ActivationSparsity:
    """CATS thresholds for a target s_FFN: every layer drops a fraction 1.5·``sparsity`` of its neurons."""
    check_target("cats", sparsity)
    if not stats.gated or stats.gate_abs is None:
        raise PrunePathError("CATS thresholds the gate activation and needs a gated FFN (gate/up/down, e.g. Llama); "
                             "use TEAL (method 'teal') for this model")
    n = stats.num_layers
    return _spec(stats, "cats", sparsity, "uniform", [0.0] * n, [1.5 * float(sparsity)] * n)


# ---- the masked FFN ------------------------------------------------------------------------------------------------

def masked_ffn(ffn: DenseFFN, x: torch.Tensor, t_in: float | None, t_mid: float | None, method: str = "teal",
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN output with TEAL / CATS masking (entries with |v| ≤ t zeroed), and the per-token fraction of FFN
    weight bytes not read [...]. Dense compute with masks; with both thresholds None it runs exactly the dense
    FFN's operations.
    """
    zeros = None
    if t_in is not None:
        drop_x = x.abs() <= t_in
        s_in = drop_x.sum(-1, dtype=torch.float32) / x.shape[-1]
        x = x.masked_fill(drop_x, 0)
    else:
        s_in = zeros = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    if ffn.gated:
        a = ffn.activation(F.linear(x, ffn.gate_w, ffn.gate_b))
        if method == "cats" and t_mid is not None:
            drop_h = a.abs() <= t_mid
            a = a.masked_fill(drop_h, 0)
        h = a * F.linear(x, ffn.up_w, ffn.up_b)
        if method == "teal" and t_mid is not None:
            drop_h = h.abs() <= t_mid
            h = h.masked_fill(drop_h, 0)
    else:
        h = ffn.activation(F.linear(x, ffn.up_w, ffn.up_b))
        if t_mid is not None:
            drop_h = h.abs() <= t_mid
            h = h.masked_fill(drop_h, 0)
    if t_mid is not None:
        s_mid = drop_h.sum(-1, dtype=torch.float32) / h.shape[-1]
    else:
        s_mid = zeros if zeros is not None else torch.zeros(h.shape[:-1], dtype=torch.float32, device=h.device)
    y = F.linear(h, ffn.down_w, ffn.down_b)
    if ffn.dropout is not None:
        y = ffn.dropout(y)
    return y, activation_s_ffn(s_in, s_mid, gated=ffn.gated, method=method)


class _Overlay:
    """The FFN owner as ``adapter.extract`` expects it, with the modules the wrapper replaced put back."""

    def __init__(self, base: Any, replaced: dict[str, nn.Module]) -> None:
        self._base, self._replaced = base, replaced

    def __getattr__(self, name: str) -> Any:
        replaced = self.__dict__["_replaced"]
        if name in replaced:
            return replaced[name]
        deeper = {k.split(".", 1)[1]: v for k, v in replaced.items() if k.startswith(name + ".")}
        base = self.__dict__["_base"]
        base = base() if isinstance(base, weakref.ref) else base
        attr = getattr(base, name)
        return _Overlay(attr, deeper) if deeper else attr


class ActivationSparseFFN(nn.Module):
    """Installed at one FFN site: the FFN with TEAL / CATS masking, from the original modules (kept as children,
    so ``.to()`` moves them). ``last_s_ffn`` [...]: per-token s_FFN of the last forward."""

    def __init__(self, adapter: Adapter, site: FFNSite, replaced: dict[str, nn.Module], gated: bool) -> None:
        super().__init__()
        self.adapter_name = adapter.name
        self.layer_index = site.layer_index
        self.site_attr = site.attr
        self.gated = gated
        self.paths = list(replaced)  # where each original module sat, relative to the owner
        self.originals = nn.ModuleList(replaced.values())
        self._owner = weakref.ref(site.owner)  # not a child: the owner already holds this module
        self.method: str = "teal"
        self.t_in: float | None = None
        self.t_mid: float | None = None
        self.last_s_ffn: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"{self.method}, layer={self.layer_index}, t_in={self.t_in}, t_mid={self.t_mid}"

    def set_thresholds(self, method: str, t_in: float | None, t_mid: float | None) -> None:
        self.method, self.t_in, self.t_mid = method, _opt_float(t_in), _opt_float(t_mid)

    def dense_ffn(self) -> DenseFFN:
        """The original FFN's weights, read now (so they follow ``.to()`` and in-place edits)."""
        overlay = _Overlay(self._owner, dict(zip(self.paths, self.originals)))
        return adapter_by_name(self.adapter_name).extract(FFNSite(self.layer_index, overlay, self.site_attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, s = masked_ffn(self.dense_ffn(), x, self.t_in, self.t_mid, self.method)
        self.last_s_ffn = s.detach()
        return y


def activation_modules(model: nn.Module) -> list[ActivationSparseFFN]:
    """The installed wrappers in layer order (empty when none)."""
    return [m for m in stats_activation_modules(model) if isinstance(m, ActivationSparseFFN)]


def _install(model: nn.Module, adapter: Adapter) -> list[ActivationSparseFFN]:
    """Wrap every FFN site, recording which modules the adapter's install replaced (to restore them exactly)."""
    wrappers = []
    for site in adapter.sites(model):
        ffn = adapter.extract(site)
        before = dict(site.owner.named_modules())
        placeholder = nn.Identity()
        adapter.install(site, placeholder)
        after = dict(site.owner.named_modules())
        changed = [n for n, m in before.items() if n and after.get(n) is not m]
        # keep only the top-most changed paths (a replaced module's own children go with it)
        top = [n for n in changed if not any(n.startswith(p + ".") for p in changed if p != n)]
        wrapper = ActivationSparseFFN(adapter, site, {n: before[n] for n in top}, ffn.gated)
        setattr(site.owner, site.attr, wrapper)
        wrappers.append(wrapper)
    return wrappers


def apply_activation_sparsity(model: nn.Module, spec: ActivationSparsity) -> nn.Module:
    """Install TEAL / CATS wrappers on a dense model (or, when installed, just set the new thresholds).

    ``model.prunepath.activation`` holds the spec; evaluators then report the measured s_FFN.
    """
    if state_of(model).config is not None:
        raise PrunePathError("TEAL / CATS run on the original dense model, not a converted one; load the model it "
                             "was converted from")
    if spec.method not in METHODS:
        raise PrunePathError(f"unknown activation-sparsity method {spec.method!r}; choose one of {', '.join(METHODS)}")
    wrappers = activation_modules(model)
    if not wrappers:
        adapter = adapter_for(model)  # raises, naming the supported architectures
        sites = adapter.sites(model)
        if not sites:
            raise PrunePathError(f"found no FFN in this {adapter.name} model; nothing to sparsify")
        if len(sites) != spec.num_layers:
            raise PrunePathError(f"the spec has {spec.num_layers} layers of thresholds but the model has {len(sites)} "
                                 "FFNs; calibrate on this model")
        if spec.method == "cats" and not adapter.extract(sites[0]).gated:
            raise PrunePathError("CATS needs a gated FFN (gate/up/down, e.g. Llama); use TEAL for this model")
        wrappers = _install(model, adapter)
    elif len(wrappers) != spec.num_layers:
        raise PrunePathError(f"the spec has {spec.num_layers} layers of thresholds but the model has {len(wrappers)} "
                             "FFNs; calibrate on this model")
    elif spec.method == "cats" and not wrappers[0].gated:
        raise PrunePathError("CATS needs a gated FFN (gate/up/down, e.g. Llama); use TEAL for this model")
    for w, t_in, t_mid in zip(wrappers, spec.t_in, spec.t_mid):
        w.set_thresholds(spec.method, t_in, t_mid)
    state_of(model).activation = spec
    return model


def remove_activation_sparsity(model: nn.Module) -> nn.Module:
    """Put the original FFN modules back (the very same objects): the model is exactly what it was."""
    for name, w in [(n, m) for n, m in model.named_modules() if isinstance(m, ActivationSparseFFN)]:
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        for path, original in zip(w.paths, w.originals):
            parent = owner.get_submodule(path.rsplit(".", 1)[0]) if "." in path else owner
            setattr(parent, path.rsplit(".", 1)[-1], original)
    state_of(model).activation = None
    return model


# ---- calibration: prunepath.baselines.activation_calibration -------------------------------------------------------


# ---- TEAL's greedy allocation ------------------------------------------------------------------------------------

@torch.no_grad()
def _layer_error(stats: ActivationStats, i: int, s_in: float, s_mid: float, x: torch.Tensor,
                 y0: torch.Tensor) -> float:
    """Relative squared error ‖y − y₀‖² / ‖y₀‖² of layer ``i``'s FFN output on its cached inputs."""
    f = stats.ffns[i]
    t_in = quantile_threshold(stats.x_abs[i], s_in)
    t_mid = quantile_threshold(stats.h_abs[i], s_mid)
    y, _ = masked_ffn(f, x, t_in, t_mid, "teal")
    return relative_error(y, y0)


def relative_error(y: torch.Tensor, y0: torch.Tensor) -> float:
    """‖y − y₀‖² / ‖y₀‖² in float32: what the greedy allocations compare between sparsity levels."""
    y0 = y0.float()
    return float(((y.float() - y0) ** 2).sum() / (y0 ** 2).sum().clamp_min(1e-30))


@torch.no_grad()
def greedy_allocation(stats: ActivationStats, target: float, step: float = GREEDY_STEP,
                      progress: bool = False) -> tuple[list[float], list[float]]:
    """TEAL's greedy allocation over (layer, tensor): from all-dense, repeatedly raise by ``step`` the sparsity
    of the x or h tensor of the layer whose FFN output error (relative, on the cached calibration inputs) grows
    least per FFN byte saved, until the mean over layers of the byte sparsity reaches ``target``. The last step is
    cut short so the target is met exactly. Returns per-layer (s_in, s_mid).

    TEAL's own code allocates within each block at a uniform block sparsity; here layers compete too, as each
    FFN's output error is measured layer-locally on the same calibration tokens.
    """
    n = stats.num_layers
    w_in, w_mid = ffn_byte_weights(stats.gated)
    weights = (w_in, w_mid)
    level = [[0.0, 0.0] for _ in range(n)]
    f0 = stats.ffns[0]
    dev, dtype = f0.up_w.device, f0.up_w.dtype
    xs = [x.to(dev, dtype) for x in stats.inputs]
    y0 = [masked_ffn(stats.ffns[i], xs[i], None, None)[0].float() for i in range(n)]
    err = [0.0] * n

    def candidates(i: int) -> list[float]:
        out = []
        for k in range(2):
            if level[i][k] + step > GREEDY_MAX + 1e-9:
                out.append(math.inf)
                continue
            trial = list(level[i])
            trial[k] += step
            e = _layer_error(stats, i, trial[0], trial[1], xs[i], y0[i])
            out.append((e - err[i]) / (weights[k] * step))
        return out

    cost = [candidates(i) for i in range(n)]
    total = 0.0  # sum over layers of the byte sparsity; the target is n · target
    bar = tqdm(total=round(n * target, 4), desc="greedy allocation", disable=not progress, leave=False)
    while total < n * target - 1e-9:
        i, k = min(((i, k) for i in range(n) for k in range(2)), key=lambda ik: cost[ik[0]][ik[1]])
        if math.isinf(cost[i][k]):
            break  # every tensor at GREEDY_MAX (check_target keeps the target below that)
        gain = min(weights[k] * step, n * target - total)
        level[i][k] += gain / weights[k]
        total += gain
        bar.update(gain)
        err[i] = _layer_error(stats, i, level[i][0], level[i][1], xs[i], y0[i])
        cost[i] = candidates(i)
    bar.close()
    return [lv[0] for lv in level], [lv[1] for lv in level]


def split_greedy(error: Callable[[float, float], float], target: float, weights: tuple[float, float], *,
                 step: float = GREEDY_STEP, cap: float = GREEDY_MAX) -> tuple[float, float]:
    """TEAL's block-wise greedy for one FFN: from (s_in, s_mid) = (0, 0), raise by ``step`` whichever of the two
    costs the least extra ``error(s_in, s_mid)`` per byte saved (``weights``: the byte shares of x and h), until
    the FFN's byte sparsity w_in·s_in + w_mid·s_mid reaches ``target``; the last step is cut short so it is met
    exactly. Neither fraction goes above ``cap``."""
    level = [0.0, 0.0]
    total, err = 0.0, error(0.0, 0.0)
    while total < target - 1e-9:
        best: tuple[float, int] | None = None
        for k in range(2):
            if level[k] + step > cap + 1e-9:
                continue
            trial = list(level)
            trial[k] += step
            cost = (error(*trial) - err) / (weights[k] * step)
            if best is None or cost < best[0]:
                best = (cost, k)
        if best is None:
            break  # both at the cap (check_target keeps targets below it)
        k = best[1]
        gain = min(weights[k] * step, target - total)
        level[k] += gain / weights[k]
        total += gain
        err = error(*level)
    return level[0], level[1]


@torch.no_grad()
def block_allocation(stats: ActivationStats, target: float, step: float = GREEDY_STEP,
                     progress: bool = False) -> tuple[list[float], list[float]]:
    """TEAL's allocation (its block-wise greedy, FFN part): every layer reaches the same byte sparsity
    ``target``; within a layer :func:`split_greedy` splits it between x and h by the FFN's relative output error
    on its cached calibration inputs. Returns per-layer (s_in, s_mid)."""
    weights = ffn_byte_weights(stats.gated)
    f0 = stats.ffns[0]
    dev, dtype = f0.up_w.device, f0.up_w.dtype
    s_in, s_mid = [], []
    for i in tqdm(range(stats.num_layers), desc="block allocation", disable=not progress, leave=False):
        x = stats.inputs[i].to(dev, dtype)
        y0 = masked_ffn(stats.ffns[i], x, None, None)[0].float()
        a, b = split_greedy(lambda u, v: _layer_error(stats, i, u, v, x, y0) if u or v else 0.0, target, weights,
                            step=step)
        s_in.append(a)
        s_mid.append(b)
    return s_in, s_mid


# ---- saving ----------------------------------------------------------------------------------------------------------

def save_activation_model(model: nn.Module, tokenizer, out: str | Path, spec: ActivationSparsity) -> Path:
    """The original dense model (``save_pretrained`` + tokenizer) plus ``prunepath_activation.json``, written
    atomically; ``prunepath.load_model(out)`` re-applies the thresholds."""

    final = Path(out).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise PrunePathError(f"{final} exists and is not empty; choose another --out")
    installed = activation_modules(model)
    previous = state_of(model).activation
    if installed:
        remove_activation_sparsity(model)  # the saved weights must carry the original module names
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
        atomic_replace_dir(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if installed and previous is not None:
            apply_activation_sparsity(model, previous)
    return final


def load_spec(path: str | Path) -> ActivationSparsity:
    """The spec in ``path`` (a ``prunepath_activation.json`` file or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / SPEC_FILE
    try:
        return ActivationSparsity.from_dict(json.loads(p.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise PrunePathError(f"cannot read the activation-sparsity spec {p} ({exc}); re-create it with "
                             "prunepath baseline --method teal|cats") from exc


def thresholds_for(stats: ActivationStats, method: str, sparsity: float,
                   allocation: str = "uniform") -> ActivationSparsity:
    """:func:`teal_thresholds` or :func:`cats_thresholds` by name."""
    check_target(method, sparsity, allocation)
    return cats_thresholds(stats, sparsity) if method == "cats" else teal_thresholds(stats, sparsity, allocation)
