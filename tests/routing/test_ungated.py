"""Ungated experts (``gates`` off): with every expert on (τ > 1) nothing scales the experts, so the router is not
run and its bytes are not read; below τ 1 it still picks the experts."""

from __future__ import annotations

import pytest
import torch

from prunepath.cli.main import build_parser
from prunepath.cli.train import resolve_config
from prunepath.pipeline.study_report import router_share
from prunepath.routing.config import RoutingConfig
from prunepath.routing.ffn import prunepath_modules
from prunepath.training.config import TrainConfig
from prunepath.training.schedule import prunepath_stage_hook
from routing.test_ffn import make_ffn, reference
from test_eval_fixtures import tiny_converted


class Refuse(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the router ran")


@pytest.mark.parametrize("gated", [True, False])
def test_every_expert_ungated_skips_the_router_and_matches_the_reference(gated):
    ffn = make_ffn(gated, True, RoutingConfig(tau=1.05, gates=False), seed=2)
    x = torch.randn(3, 5, ffn.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(ffn, x)  # float64, every expert at weight 1
        ffn.router = Refuse()
        got = ffn(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert bool((ffn.last_active == ffn.num_experts).all())
    ffn.routing.tau = 0.6  # below 1 the router picks the experts again
    with pytest.raises(AssertionError, match="the router ran"), torch.no_grad():
        ffn(x)


@pytest.mark.parametrize("rule,tau,gates,needed", [
    ("cumulative", 1.05, False, False), ("cumulative", 1.05, True, True), ("cumulative", 0.9, False, True),
    ("nucleus", 1.2, False, False), ("all", None, False, False), ("topk", 0.5, False, True)])
def test_router_needed(rule, tau, gates, needed):
    r = RoutingConfig(rule=rule, tau=tau if tau is not None else 1.05, k=2 if rule == "topk" else None, gates=gates)
    assert r.router_needed(0) is needed
    r.layer_tau = {1: 0.5}
    assert r.router_needed(1) is (rule != "all")  # a layer with its own τ < 1 needs it


def test_training_without_gates_sets_the_routing_and_the_cli_flag():
    model = tiny_converted(seed=1, layers=2)
    cfg = TrainConfig(method="prunepath", gates=False, tau_min=0.7)
    prunepath_stage_hook(model, 2, 3, 10, cfg)
    assert all(not m.routing.gates for m in prunepath_modules(model))
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--no-gates"])
    assert resolve_config(args).gates is False
    assert resolve_config(build_parser().parse_args(["train", "--model", "m", "--data", "d"])).gates is True


def test_report_counts_no_router_bytes_for_ungated_every_expert_points():
    base = {"router_bytes_frac": 0.02, "s_ffn": 0.4}
    assert router_share({**base, "tau": 1.05, "gates": False}) == 0.0
    assert router_share({**base, "tau": 0.9, "gates": False}) == 0.02
    assert router_share({**base, "tau": 1.05, "gates": True}) == 0.02
    assert router_share({**base, "tau": 1.05}) == 0.02  # records from before the field: gated
