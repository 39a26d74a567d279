"""Baseline routing rules (LTE, MoEfication top-k, D2DMoE dynamic-k) on hand-made inputs, LTE's losses, and
router fitting with the backbone frozen, on tiny random models."""

from types import SimpleNamespace

import pytest
import torch

import prunepath
from prunepath.baselines import fitting, lte, prepare
from prunepath.baselines.calibration import collect_ffn_inputs, expert_mass, expert_output_norms, token_batches
from prunepath.baselines.d2dmoe import dynamic_k_method
from prunepath.baselines.knobs import knob_for_sparsity, sparsity_on_inputs
from prunepath.baselines.moefication import MoEficationRouter, moefication_targets, topk_method
from prunepath.routing.config import RoutingConfig

from test_baselines_pruning import tiny_tokenizer, random_texts  # noqa: E402


def no_always_on(e):
    return torch.zeros(e, dtype=torch.bool)


def converted(tiny_model, seed=0):
    m = tiny_model("llama", seed)
    prunepath.moefy(m, neurons_per_expert=8, progress=False)
    return m


# ---- LTE ---------------------------------------------------------------------------------------------------
def test_lte_hard_keeps_exactly_gates_above_threshold():
    g = torch.tensor([[2.0, 0.0, -1.0, 0.3], [-3.0, -0.2, 0.1, 5.0]])
    r = RoutingConfig(method="lte", params={"soft": False, "threshold": 0.5})
    w, m = lte.lte_method(g, r, 0, no_always_on(4))
    expect = torch.sigmoid(g) > 0.5  # logit 0 → exactly δ → dropped (strict)
    assert torch.equal(m, expect) and not m[0, 1]
    assert torch.equal(w, expect.float())  # unweighted
    r.params["threshold"] = 0.6
    _, m = lte.lte_method(g, r, 0, no_always_on(4))
    assert torch.equal(m, torch.sigmoid(g) > 0.6)
    always = torch.tensor([False, False, True, False])
    _, m = lte.lte_method(g, r, 0, always)
    assert m[:, 2].all()


def test_lte_soft_weights_every_expert_and_reports_zero_sparsity(tiny_model):
    g = torch.randn(5, 7)
    w, m = lte.lte_method(g, RoutingConfig(method="lte", params={"soft": True}), 0, no_always_on(7))
    assert m.all() and torch.allclose(w, torch.sigmoid(g))
    model = converted(tiny_model)
    prepare(model, "lte", soft=True)
    model(input_ids=torch.randint(0, 100, (2, 9)))
    assert prunepath.sparsity(model).s_ffn == 0.0
    prunepath.configure(model, params={"soft": False, "threshold": 0.5})
    model(input_ids=torch.randint(0, 100, (2, 9)))
    assert prunepath.sparsity(model).s_ffn > 0.0


def test_lte_efficiency_loss_pushes_every_gate_down():
    logits = torch.randn(4, 6, 8, requires_grad=True)
    lte.efficiency_loss(torch.sigmoid(logits)).backward()
    assert (logits.grad > 0).all()  # gradient descent lowers every logit, hence every gate
    x = torch.randn(4, 6, 8, requires_grad=True)
    opt = torch.optim.SGD([x], lr=50.0)
    before = torch.sigmoid(x).detach().clone()
    for _ in range(5):
        opt.zero_grad()
        lte.efficiency_loss(torch.sigmoid(x)).backward()
        opt.step()
    assert (torch.sigmoid(x) < before).all()


def test_lte_separability_pushes_gates_away_from_threshold():
    delta = 0.5
    logits = torch.tensor([-2.0, -0.3, -0.05, 0.05, 0.4, 1.5], requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1e-3)
    start = (torch.sigmoid(logits) - delta).abs().detach().clone()
    side = (torch.sigmoid(logits) > delta).detach().clone()
    for _ in range(20):
        opt.zero_grad()
        lte.separability_loss(torch.sigmoid(logits), delta).backward()
        opt.step()
    s = torch.sigmoid(logits)
    assert ((s - delta).abs() > start).all()      # every gate moved away from δ
    assert torch.equal(s > delta, side)             # without crossing it
    # a token mask drops padding positions from the mean
    g = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    keep = torch.tensor([True, False])
    assert torch.isclose(lte.separability_loss(g, delta, 1e-3, keep), lte.separability_loss(g[:1], delta, 1e-3))


def test_lte_aux_loss_weights_and_stage_hook(tiny_model):
    scores = [torch.randn(2, 5, 4, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    cfg = SimpleNamespace(method="lte", method_params={"eta": 0.3, "sep_weight": 0.01, "threshold": 0.5,
                                                       "sep_eps": 1e-3})
    out = lte.lte_aux_loss(scores, mask, cfg)
    eff = sum(torch.sigmoid(s)[mask].mean() for s in scores) / 3
    sep = sum((1 / ((torch.sigmoid(s)[mask] - 0.5) ** 2 + 1e-3)).mean() for s in scores) / 3
    assert torch.isclose(out["lte_efficiency"], 0.3 * eff) and torch.isclose(out["lte_separability"], 0.01 * sep)
    model = converted(tiny_model)
    prepare(model, "lte")
    lte.lte_stage_hook(model, 1, 0, 10, cfg)
    r = model.prunepath.config.routing
    assert r.method == "lte" and r.params["soft"] is True and cfg.method_params["lte_phase"] == "soft"
    assert all(p.requires_grad for f in prunepath.prunepath_modules(model) for p in f.router.parameters())
    lte.lte_stage_hook(model, 2, 5, 10, cfg)
    assert r.params["soft"] is False and r.params["threshold"] == 0.5
    assert not any(p.requires_grad for f in prunepath.prunepath_modules(model) for p in f.router.parameters())
    zero = lte.lte_aux_loss(scores, mask, cfg)  # stage 2: router frozen, task loss only
    assert float(zero["lte_efficiency"]) == 0.0 and float(zero["lte_separability"]) == 0.0
    assert lte.is_soft_stage(None, 2, 10, cfg) and not lte.is_soft_stage(None, 7, 10, cfg)


# ---- MoEfication -------------------------------------------------------------------------------------------
def test_topk_selects_k_highest_ties_to_lower_index():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.5, -1.0], [3.0, 3.0, 3.0, 0.0, 0.0]])
    r = RoutingConfig(method="moefication", k=2)
    w, m = topk_method(s, r, 0, no_always_on(5))
    assert m.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert torch.equal(w, m.float())
    r.params = {"k": 9}
    assert topk_method(s, r, 0, no_always_on(5))[1].all()
    always = torch.tensor([False, False, False, False, True])
    _, m = topk_method(s, RoutingConfig(method="moefication", k=1), 0, always)
    assert m.tolist() == [[False, True, False, False, True], [True, False, False, False, True]]
    with pytest.raises(prunepath.PrunePathError, match="needs k"):
        topk_method(s, RoutingConfig(method="moefication"), 0, no_always_on(5))


def test_moefication_router_init_and_targets(tiny_model):
    model = converted(tiny_model)
    ffn = prunepath.prunepath_modules(model)[0]
    router = MoEficationRouter(ffn.hidden_size, ffn.num_experts)
    router.init_from_centroids(ffn)
    assert torch.equal(router.fc2.weight, torch.eye(ffn.num_experts))
    rows = ffn.gate_proj.weight.double()
    for e in range(ffn.num_experts):
        blk = rows[e * 8:(e + 1) * 8]
        cent = (blk / blk.norm(dim=1, keepdim=True)).mean(0)
        assert torch.allclose(router.fc1.weight[e].double(), cent, atol=1e-6)
    x = torch.randn(5, ffn.hidden_size)
    assert torch.allclose(router(x), router(7.5 * x), atol=1e-6)  # input normalised to unit length
    mass = expert_mass(ffn, x)
    h = (torch.nn.functional.silu(x.double() @ ffn.gate_proj.weight.double().t())
         * (x.double() @ ffn.up_proj.weight.double().t())).abs()
    assert torch.allclose(mass.double(), h.view(5, ffn.num_experts, 8).sum(-1), rtol=1e-5, atol=1e-6)
    t = moefication_targets(torch.tensor([[1.0, 4.0, 2.0], [0.0, 0.5, 0.5]]))
    assert torch.allclose(t, torch.tensor([[0.25, 1.0, 0.5], [0.0, 1.0, 1.0]]))


# ---- D2DMoE ------------------------------------------------------------------------------------------------
def test_dynamic_k_keeps_experts_above_fraction_of_max():
    pred = torch.tensor([[4.0, 2.0, 1.9, 0.0], [1.0, 1.0, 0.2, 0.6]])
    r = RoutingConfig(method="d2dmoe", tau=0.5)
    w, m = dynamic_k_method(pred, r, 0, no_always_on(4))
    assert m.tolist() == [[True, True, False, False], [True, True, False, True]]
    assert torch.equal(w, m.float())
    r.tau = 1.05
    assert dynamic_k_method(pred, r, 0, no_always_on(4))[1].all()
    r.tau = 1e-6
    assert dynamic_k_method(pred, r, 0, no_always_on(4))[1].sum(-1).tolist() == [1, 2]
    r.layer_tau = {3: 1.05}
    assert dynamic_k_method(pred, r, 3, no_always_on(4))[1].all()


def test_expert_output_norms_match_float64_reference(tiny_model):
    model = converted(tiny_model)
    ffn = prunepath.prunepath_modules(model)[1]
    x = torch.randn(3, 4, ffn.hidden_size)
    got = expert_output_norms(ffn, x, chunk=5)
    W = {k: v.double() for k, v in ffn.state_dict().items()}
    xs = x.double()
    h = torch.nn.functional.silu(xs @ W["gate_proj.weight"].t()) * (xs @ W["up_proj.weight"].t())
    for e in range(ffn.num_experts):
        sl = slice(e * 8, (e + 1) * 8)
        ref = (h[..., sl] @ W["down_proj.weight"][:, sl].t()).norm(dim=-1)
        assert torch.allclose(got[..., e].double(), ref, rtol=1e-4, atol=1e-6)


# ---- fitting with the backbone frozen ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["moefication", "d2dmoe", "prunepath", "lte"])
def test_fit_router_lowers_its_loss_and_leaves_backbone_alone(tiny_model, method):
    model = converted(tiny_model)
    tok = tiny_tokenizer()
    texts = random_texts(40)
    inputs = collect_ffn_inputs(model, token_batches(tok, texts, seq_len=16, max_tokens=512), progress=False)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if ".router." not in k}
    short = fitting.fit_router(model, inputs=inputs, method=method, steps=1, lr=1e-2, progress=False,
                               params={"eta": 0.01})
    long = fitting.fit_router(model, inputs=inputs, method=method, steps=60, lr=1e-2, progress=False,
                              params={"eta": 0.01})
    assert sum(long["final_loss"]) < sum(short["final_loss"])
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone.items())
    assert model.prunepath.config.routing.method == method
    kind = {"prunepath": "linear"}.get(method, method)
    assert model.prunepath.config.router == kind


def test_fitted_d2dmoe_and_knob_search(tiny_model):
    model = converted(tiny_model)
    tok = tiny_tokenizer()
    inputs = collect_ffn_inputs(model, token_batches(tok, random_texts(40), seq_len=16, max_tokens=512),
                                progress=False)
    fitting.fit_router(model, inputs=inputs, method="d2dmoe", steps=200, lr=1e-2, progress=False)
    ffn = prunepath.prunepath_modules(model)[0]
    pred = ffn.router(inputs[0]).detach()
    true = expert_output_norms(ffn, inputs[0])
    # predicted norms rank experts like the true ones (Spearman-like check on the per-token argmax)
    agree = (pred.argmax(-1) == true.argmax(-1)).float().mean()
    assert agree > 2.0 / ffn.num_experts
    tau, s = knob_for_sparsity(model, inputs, "d2dmoe", 0.5)
    assert abs(s - sparsity_on_inputs(model, inputs, tau=tau)) < 1e-9
    assert abs(s - 0.5) < 0.15
    k, s = knob_for_sparsity(model, inputs, "moefication", 0.5)
    assert k == 4


def test_prepare_and_checkpoint_roundtrip(tiny_model, tmp_path):
    ids = torch.randint(0, 100, (2, 11))
    for method, kw in [("lte", {"soft": False}), ("moefication", {"k": 3}), ("d2dmoe", {"tau": 0.4})]:
        model = converted(tiny_model)
        prepare(model, method, **kw)
        ref = model(input_ids=ids).logits
        s = prunepath.sparsity(model).s_ffn
        prunepath.save(model, tmp_path / method)
        loaded, _ = prunepath.load(tmp_path / method)
        assert torch.allclose(loaded(input_ids=ids).logits, ref, atol=1e-5)
        assert prunepath.sparsity(loaded).s_ffn == s
        assert loaded.prunepath.config.router == method
    with pytest.raises(prunepath.PrunePathError):
        prepare(converted(tiny_model), "nope")


def test_prepare_for_training_sets_lte_router_once(tiny_model):
    from prunepath.baselines import prepare_for_training

    model = converted(tiny_model)
    cfg = SimpleNamespace(method="lte", method_params={"init_bias": 3.0, "threshold": 0.4})
    prepare_for_training(model, cfg)
    ffn = prunepath.prunepath_modules(model)[0]
    assert model.prunepath.config.router == "lte" and torch.all(ffn.router.bias == 3.0)
    assert model.prunepath.config.routing.params == {"soft": True, "threshold": 0.4}
    router = ffn.router
    prepare_for_training(model, cfg)  # idempotent: keeps the (possibly trained) router
    assert prunepath.prunepath_modules(model)[0].router is router
    with pytest.raises(prunepath.PrunePathError, match="fit_router"):
        prepare_for_training(model, SimpleNamespace(method="moefication", method_params={}))


def test_report_table_picks_nearest_point_within_tolerance():
    from prunepath.pipeline.compare_report import table

    rows = [{"key": "a@0.3", "s_ffn": 0.31, "ppl": 10.0}, {"key": "a@0.5", "s_ffn": 0.58, "ppl": 20.0},
            {"key": "lte(eta=1.0)@delta=0.5", "s_ffn": 0.5, "ppl": 30.0}]
    md = table(rows, targets=(0.3, 0.5))
    assert "| a | 10 (0.31) | – |" in md
    assert "| lte(eta=1.0) | – | 30 (0.50) |" in md
