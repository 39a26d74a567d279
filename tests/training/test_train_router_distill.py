"""--router-distill: a KL from each token's true expert-output shares (recomputed on the current weights) to the
router softmax, against float64 references, and its effect in a tiny training run."""

from __future__ import annotations

import json
import os

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.training.config import TrainConfig
from prunepath.training.losses import router_distill_kl
from prunepath.training.trainer import train
from test_train_helpers import one_thread, tiny_llama, tiny_lm_data, tiny_tokenizer


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))


def test_router_distill_kl_matches_a_float64_reference():
    g = _gen()
    logits = torch.randn(2, 5, 9, generator=g)
    q = torch.softmax(torch.randn(2, 5, 9, generator=g), -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    always = torch.zeros(9, dtype=torch.bool)
    always[[2, 7]] = True
    for on in (None, always):
        ref, n = 0.0, 0
        keep = torch.ones(9, dtype=torch.bool) if on is None else ~on
        for b in range(2):
            for t in range(5):
                if not mask[b, t]:
                    continue
                qq = q[b, t, keep].double()
                qq = qq / qq.sum()
                lp = torch.log_softmax(logits[b, t, keep].double(), -1)
                ref += float((qq * (qq.log() - lp)).sum())
                n += 1
        assert float(router_distill_kl(logits, q, mask, on)) == pytest.approx(ref / n, rel=1e-5)
    assert float(router_distill_kl(q.log(), q, mask)) == pytest.approx(0.0, abs=1e-6)  # router = target: KL 0


def test_captured_target_is_the_softmax_of_true_expert_output_norms():
    model = prunepath.moefy(tiny_llama(3), neurons_per_expert=8, progress=False)
    ffn = prunepath.prunepath_modules(model)[0]
    x = torch.randn(2, 6, model.config.hidden_size, generator=_gen())
    ffn.capture_norm_target = 0.5
    with torch.no_grad():
        ffn(x)
    # reference in float64: ‖act(x W_g,e) ⊙ (x W_u,e) W_d,e‖ for every expert e, then softmax(log c / T)
    e, n = ffn.num_experts, ffn.neurons_per_expert
    xd = x.double().reshape(-1, x.shape[-1])
    h = torch.nn.functional.silu(xd @ ffn.gate_proj.weight.double().T) * (xd @ ffn.up_proj.weight.double().T)
    w = ffn.down_proj.weight.double()
    c = torch.stack([(h[:, i * n:(i + 1) * n] @ w[:, i * n:(i + 1) * n].T).norm(dim=-1) for i in range(e)], -1)
    want = torch.softmax(c.log() / 0.5, -1).view(2, 6, e)
    assert torch.allclose(ffn.last_norm_target.double(), want, atol=1e-5)
    assert torch.allclose(ffn.expert_output_norms(x).double().view(-1, e), c, rtol=1e-4)


def _cfg(**kw):
    base = dict(stage1_steps=0, stage2_steps=12, tau_min=0.6, tau_schedule="fixed", batch_size=4, seq_len=32,
                device="cpu", lr_backbone=0.0, lr_router=1e-2, eta=0, lam=0, progress=False, seed=0,
                max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def test_router_distill_trains_the_router_towards_the_true_shares(tmp_path):
    data = tiny_lm_data()
    model = prunepath.moefy(tiny_llama(4), neurons_per_expert=8, progress=False)
    train(model, tiny_tokenizer(), data, _cfg(router_distill=1.0), out_dir=tmp_path / "r")
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["router_distill"] > 0
    assert log[-1]["router_distill"] < 0.7 * log[0]["router_distill"]  # the router learns the shares
    ffns = prunepath.prunepath_modules(model)
    assert all(f.capture_norm_target is None and f.last_norm_target is None for f in ffns)  # released after


@pytest.mark.parametrize("bad,match", [({"router_distill": -1.0}, ">= 0"),
                                       ({"router_distill": 0.5, "method": "lte"}, "does not apply")])
def test_bad_router_distill_settings(bad, match):
    with pytest.raises(PrunePathError, match=match):
        _cfg(**bad)
