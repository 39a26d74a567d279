"""The τ schedule (PAPER.md §4) and stage hooks."""

import pytest

import prunepath
from prunepath.routing.config import TAU_ALL
from prunepath.training.config import TrainConfig
from prunepath.training.schedule import (get_stage_hook, layer_taus, prunepath_stage_hook, register_stage_hook,
                                         scheduled_tau)


def test_stage1_is_all_expert_warmup():
    cfg = TrainConfig(stage1_steps=5, stage2_steps=10, tau_min=0.5)
    assert {scheduled_tau(1, s, 5, cfg) for s in range(5)} == {1.05}


@pytest.mark.parametrize("steps,rounds", [(10, 5), (23, 4), (7, 10), (100, 10)])
def test_linear_schedule_rounds(steps, rounds):
    cfg = TrainConfig(stage2_steps=steps, tau_min=0.55, tau_rounds=rounds)
    taus = [scheduled_tau(2, s, steps, cfg) for s in range(steps)]
    assert taus[0] == pytest.approx(1.0)
    assert taus[-1] == pytest.approx(0.55)  # the schedule reaches τ_min
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    t_eff = min(rounds, steps)
    assert len(set(round(t, 9) for t in taus)) == t_eff
    # Equal shares: no round is more than one step longer than another.
    counts = [taus.count(t) for t in sorted(set(taus))]
    assert max(counts) - min(counts) <= 1
    # Linear spacing between rounds.
    levels = sorted(set(taus), reverse=True)
    gaps = [a - b for a, b in zip(levels, levels[1:])]
    assert all(g == pytest.approx(gaps[0]) for g in gaps)


def test_fixed_schedule():
    cfg = TrainConfig(stage2_steps=8, tau_min=0.7, tau_schedule="fixed")
    assert {scheduled_tau(2, s, 8, cfg) for s in range(8)} == {0.7}


def test_sample_schedule_covers_the_range_and_replays():
    cfg = TrainConfig(stage2_steps=400, tau_min=0.55, tau_schedule="sample", tau_all_prob=0.25, seed=3)
    taus = [scheduled_tau(2, s, 400, cfg) for s in range(400)]
    every = [t for t in taus if t == 1.05]
    sparse = [t for t in taus if t != 1.05]
    assert 0.15 < len(every) / len(taus) < 0.35  # tau_all_prob of the steps run every expert
    assert all(0.55 <= t <= 1.0 for t in sparse)
    assert min(sparse) < 0.6 and max(sparse) > 0.95  # the whole range is visited
    assert taus == [scheduled_tau(2, s, 400, cfg) for s in range(400)]  # a resume replays the same sequence
    other = [scheduled_tau(2, s, 400, TrainConfig(stage2_steps=400, tau_min=0.55, tau_schedule="sample", seed=4))
             for s in range(400)]
    assert other != taus
    # Per-layer τ_min: the same draw mapped to the layer's own range.
    cfg2 = TrainConfig(stage2_steps=400, tau_min=0.55, tau_schedule="sample", tau_all_prob=0.0, layer_tau={1: 0.8})
    for s in range(20):
        u = (1.0 - scheduled_tau(2, s, 400, cfg2)) / 0.45
        assert layer_taus(2, s, 400, cfg2, 3)[1] == pytest.approx(1.0 - 0.2 * u)


@pytest.mark.parametrize("kw,match", [(dict(tau_all_prob=1.01), "tau-all-prob"), (dict(tau_all_prob=-0.1), "tau-all-prob"),
                                      (dict(train_scope="attention"), "train-scope"),
                                      (dict(train_scope="ffn", method="dense"), "train-scope")])
def test_schedule_and_scope_errors(kw, match):
    """Out-of-range schedule settings are refused by name (tau_all_prob 1.0, every step dense, is allowed: it
    trains only in-expert sparsity)."""
    from prunepath.errors import PrunePathError

    with pytest.raises(PrunePathError, match=match):
        TrainConfig(**kw)


def test_layer_taus_dense_and_per_layer():
    cfg = TrainConfig(stage2_steps=4, tau_min=0.6, tau_rounds=2, dense_layers=[0, -1], layer_tau={2: 0.8})
    assert layer_taus(1, 0, 4, cfg, 5) == {}
    last = layer_taus(2, 3, 4, cfg, 5)
    assert last[0] == last[4] == 1.05 and last[2] == pytest.approx(0.8)
    first = layer_taus(2, 0, 4, cfg, 5)
    assert first[2] == pytest.approx(1.0)


def test_hook_configures_the_model():
    from test_train_helpers import tiny_llama

    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    cfg = TrainConfig(stage2_steps=4, tau_min=0.6, tau_rounds=4, gate_offset=2.0, dense_layers=[1])
    prunepath_stage_hook(m, 2, 3, 4, cfg)
    r = m.prunepath.config.routing
    assert r.tau == pytest.approx(0.6) and r.gate_offset == 2.0 and r.layer_tau == {1: 1.05}
    prunepath_stage_hook(m, 1, 0, 4, cfg)
    assert r.tau == 1.05 and r.layer_tau == {}


def test_register_stage_hook():
    calls = []
    register_stage_hook("unit-test-hook", lambda *a: calls.append(a))
    get_stage_hook("unit-test-hook")(None, 2, 1, 3, None)
    assert calls == [(None, 2, 1, 3, None)]
    assert get_stage_hook("prunepath") is prunepath_stage_hook


def test_every_step_dense_with_tau_all_prob_one():
    cfg = TrainConfig(stage2_steps=50, tau_schedule="sample", tau_all_prob=1.0)
    assert {scheduled_tau(2, s, 50, cfg) for s in range(50)} == {TAU_ALL}
