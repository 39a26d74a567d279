"""Distillation from the frozen dense model (``--distill``): the KL term against a float64 reference, its fixed
point at the teacher, and that it pulls a converted model towards the dense one."""

from __future__ import annotations

import json
import os

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.training.config import TrainConfig
from prunepath.training.losses import distill_kl
from prunepath.training.trainer import train
from test_train_helpers import one_thread, tiny_llama, tiny_lm_data, tiny_tokenizer


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_distill_kl_matches_a_float64_reference():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, 4:] = -100
    labels[2, 1] = -100
    temp = 1.7
    ref, n = 0.0, 0
    for b in range(3):
        for i in range(6):  # position i predicts label i + 1
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(t[b, i].double() / temp, -1)
            q = torch.log_softmax(s[b, i].double() / temp, -1)
            ref += float((p * (p.log() - q)).sum())
            n += 1
    assert float(distill_kl(s, t, labels, temp)) == pytest.approx(ref / n * temp ** 2, rel=1e-5)
    assert float(distill_kl(t, t, labels, temp)) == pytest.approx(0.0, abs=1e-6)


def _cfg(**kw):
    base = dict(stage1_steps=4, stage2_steps=8, tau_min=0.5, tau_rounds=4, batch_size=4, seq_len=32, device="cpu",
                lr_backbone=3e-3, lr_router=1e-2, progress=False, seed=0, max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _kl_to(model, teacher, data) -> float:
    ids = torch.stack([data[i]["input_ids"] for i in range(8)])
    labels = torch.stack([data[i]["labels"] for i in range(8)])
    with torch.no_grad():
        return float(distill_kl(model(input_ids=ids).logits, teacher(input_ids=ids).logits, labels))


def test_pure_distillation_keeps_the_dense_model_near_its_start(tmp_path):
    data, teacher = tiny_lm_data(), tiny_llama(1)
    distilled, tuned = tiny_llama(1), tiny_llama(1)
    train(distilled, tiny_tokenizer(), data, _cfg(method="dense", distill=1.0), out_dir=tmp_path / "d")
    train(tuned, tiny_tokenizer(), data, _cfg(method="dense", distill=0.0), out_dir=tmp_path / "t")
    log = _log(tmp_path / "d")
    assert abs(log[0]["distill"]) < 1e-6  # the teacher is the model as given: KL 0 before the first update
    assert all(r["loss"] == pytest.approx(r["distill"]) for r in log)  # weight 1: the task loss is not trained
    # Adam turns the rounding-level gradients at the fixed point into small steps, so "near", not "equal".
    assert _kl_to(distilled, teacher, data) < 0.1 * _kl_to(tuned, teacher, data)


def _ffn_heavy_llama(seed: int):
    """The tiny Llama with its FFNs scaled up, so that dropping experts visibly changes the next-token distribution
    (in the plain tiny model the residual stream dwarfs the FFNs)."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(8.0)
            layer.mlp.down_proj.weight.mul_(8.0)
    return model


def test_distillation_pulls_the_converted_model_towards_the_dense_one(tmp_path):
    data, dense = tiny_lm_data(), _ffn_heavy_llama(2)
    model = prunepath.moefy(_ffn_heavy_llama(2), neurons_per_expert=8, progress=False)
    settings = dict(distill=1.0, stage1_steps=0, stage2_steps=16, tau_schedule="fixed", tau_min=0.4, eta=0, lam=0,
                    lr_backbone=1e-3)
    train(model, tiny_tokenizer(), data, _cfg(**settings), out_dir=tmp_path / "p")
    log = _log(tmp_path / "p")
    assert log[0]["s_ffn"] > 0.3 and log[0]["distill"] > 1e-3
    assert log[-1]["distill"] < 0.5 * log[0]["distill"]
    untrained = prunepath.moefy(_ffn_heavy_llama(2), neurons_per_expert=8, progress=False)
    for m in (model, untrained):
        prunepath.configure(m, tau=0.4)
    assert _kl_to(model, dense, data) < 0.5 * _kl_to(untrained, dense, data)


@pytest.mark.parametrize("bad,match", [({"distill": 1.5}, "in \\[0, 1\\]"), ({"distill": -0.1}, "in \\[0, 1\\]"),
                                       ({"distill": 0.5, "distill_temperature": 0}, "temperature"),
                                       ({"distill": 0.5, "task": "classify"}, "causal LM")])
def test_bad_distill_settings(bad, match):
    with pytest.raises(PrunePathError, match=match):
        _cfg(**bad)
