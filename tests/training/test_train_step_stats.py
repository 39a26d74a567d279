"""stats.s_ffn_tensor (the trainer's per-step s_FFN, kept on the device) equals prunepath.sparsity() on fresh inputs
with padding."""

from __future__ import annotations

import torch

import prunepath
from prunepath.stats import s_ffn_tensor


def test_device_s_ffn_matches_sparsity_with_padding(tiny_model):
    torch.manual_seed(int.from_bytes(__import__("os").urandom(2), "little"))
    model = tiny_model("llama")
    prunepath.moefy(model, neurons_per_expert=16, seed=0, progress=False)
    ffns = prunepath.prunepath_modules(model)
    for f in ffns:  # a non-trivial router, so the active counts differ per token and layer
        torch.nn.init.normal_(f.router.weight, std=2.0)
    prunepath.configure(model, tau=0.6)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 2:] = False
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask.long())
    want = prunepath.sparsity(model, mask).s_ffn
    got = float(s_ffn_tensor(model, mask))
    assert 0 < want < 1
    assert abs(got - want) < 1e-6
    # the padding matters: all tokens counted gives another value unless the padded tokens happen to match
    all_tokens = prunepath.sparsity(model, None).s_ffn
    assert abs(float(s_ffn_tensor(model, None)) - all_tokens) < 1e-6


def test_device_s_ffn_matches_sparsity_with_in_expert_thresholds(tiny_model):
    # training-time batch thresholds (a different input / intermediate fraction) on top of expert routing
    torch.manual_seed(int.from_bytes(__import__("os").urandom(2), "little"))
    model = tiny_model("llama")
    prunepath.moefy(model, neurons_per_expert=16, seed=0, progress=False)
    for f in prunepath.prunepath_modules(model):
        torch.nn.init.normal_(f.router.weight, std=2.0)
        f.inner_fraction = (0.25, 0.55)
    prunepath.configure(model, tau=0.7)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask.long())
    want = prunepath.sparsity(model, mask)
    assert want.s_ffn > 1 - want.mean_active / want.num_experts  # the thresholds add bytes not read
    assert abs(float(s_ffn_tensor(model, mask)) - want.s_ffn) < 1e-6
    assert abs(float(s_ffn_tensor(model, None)) - prunepath.sparsity(model, None).s_ffn) < 1e-6
