"""Every architecture adapter: the all-experts, gates-off model reproduces the dense model; save/load is exact."""

import pytest
import torch
from torch import nn

import prunepath
from prunepath import PrunePathError
from conftest import ARCHS, main_output


@pytest.mark.parametrize("arch", ARCHS)
def test_all_experts_reproduce_dense_and_roundtrip(arch, tiny_model, tmp_path):
    model = tiny_model(arch)
    ids = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = main_output(model, ids)
        prunepath.moefy(model, neurons_per_expert=8, seed=0, progress=False)
        prunepath.configure(model, rule="all", gates=False)
        converted = main_output(model, ids)
    assert (converted - dense).abs().max() <= 1e-4
    assert len(prunepath.prunepath_modules(model)) == 2
    # Sparse routing actually changes the output (the experts are live, not bypassed).
    with torch.no_grad(), prunepath.routing(model, rule="cumulative", tau=0.3, gates=True):
        sparse = main_output(model, ids)
        assert prunepath.sparsity(model).s_ffn > 0
    assert (sparse - dense).abs().max() > 1e-4
    prunepath.configure(model, rule="cumulative", tau=0.5, gates=True)
    with torch.no_grad():
        before = main_output(model, ids)
    prunepath.save(model, tmp_path / "ckpt")
    loaded, _ = prunepath.load(tmp_path / "ckpt")
    assert loaded.prunepath.config.routing.tau == 0.5
    with torch.no_grad():
        after = main_output(loaded, ids)
    assert torch.equal(before, after)


def test_experts_are_contiguous_permutations_of_dense_neurons(tiny_model):
    model = tiny_model("llama")
    dense_gate = model.model.layers[0].mlp.gate_proj.weight.detach().clone()
    dense_down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    prunepath.moefy(model, num_experts=4, progress=False)
    ffn = prunepath.prunepath_modules(model)[0]
    assert torch.equal(ffn.gate_proj.weight, dense_gate[ffn.neuron_index])
    assert torch.equal(ffn.down_proj.weight, dense_down[:, ffn.neuron_index])
    assert ffn.num_experts == 4 and ffn.neurons_per_expert == 16


def test_moefy_is_deterministic_for_a_seed(tiny_model):
    a = prunepath.moefy(tiny_model("gpt2"), neurons_per_expert=8, seed=3, progress=False)
    b = prunepath.moefy(tiny_model("gpt2"), neurons_per_expert=8, seed=3, progress=False)
    ia = [m.neuron_index for m in prunepath.prunepath_modules(a)]
    ib = [m.neuron_index for m in prunepath.prunepath_modules(b)]
    assert all(torch.equal(x, y) for x, y in zip(ia, ib))


def test_gpt2_output_bias_is_shared_and_input_bias_moves(tiny_model):
    model = tiny_model("gpt2")
    b_in = model.transformer.h[0].mlp.c_fc.bias.detach().clone()
    b_out = model.transformer.h[0].mlp.c_proj.bias.detach().clone()
    prunepath.moefy(model, neurons_per_expert=8, progress=False)
    ffn = prunepath.prunepath_modules(model)[0]
    assert torch.equal(ffn.up_proj.bias, b_in[ffn.neuron_index])
    assert torch.equal(ffn.down_proj.bias, b_out)


def test_unsupported_architecture_lists_supported(tiny_model):
    import transformers as T

    model = T.T5Model(T.T5Config(vocab_size=50, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(PrunePathError, match="unsupported architecture 't5'.*llama"):
        prunepath.moefy(model)

    class NotHF(nn.Module):
        pass

    with pytest.raises(PrunePathError, match="unsupported architecture 'NotHF'"):
        prunepath.moefy(NotHF())


def test_bad_expert_sizes(tiny_model):
    with pytest.raises(PrunePathError, match="neurons_per_expert=7 does not divide the FFN width 64"):
        prunepath.moefy(tiny_model("llama"), neurons_per_expert=7, progress=False)
    with pytest.raises(PrunePathError, match="num_experts=5"):
        prunepath.moefy(tiny_model("opt"), num_experts=5, progress=False)


def test_converting_twice_is_refused(tiny_model):
    model = prunepath.moefy(tiny_model("llama"), neurons_per_expert=8, progress=False)
    with pytest.raises(PrunePathError, match="already converted"):
        prunepath.moefy(model)


def test_configure_validates_before_changing(tiny_model):
    model = prunepath.moefy(tiny_model("llama"), neurons_per_expert=8, progress=False)
    prunepath.configure(model, tau=0.7)
    for bad in (dict(tau=0.0), dict(tau=-1.0), dict(rule="bogus"), dict(rule="topk", k=0)):
        with pytest.raises(PrunePathError):
            prunepath.configure(model, **bad)
        assert model.prunepath.config.routing.tau == 0.7 and model.prunepath.config.routing.rule == "cumulative"
    with pytest.raises(PrunePathError, match="convert it first"):
        prunepath.configure(tiny_model("llama"), tau=0.5)


def test_sparsity_statistics(tiny_model):
    model = prunepath.moefy(tiny_model("llama"), neurons_per_expert=8, progress=False)  # 8 experts, zero router
    ids = torch.randint(0, 100, (2, 5))
    prunepath.configure(model, tau=0.5)  # uniform p = 1/8: cumulative 0.125..0.375 < 0.5 → 3 experts
    with torch.no_grad():
        model(input_ids=ids)
    s = prunepath.sparsity(model)
    assert s.mean_active == 3.0 and s.s_ffn == pytest.approx(1 - 3 / 8) and s.tokens == 10
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert prunepath.sparsity(model, token_mask=mask).tokens == 4
    dense = tiny_model("llama")
    assert prunepath.sparsity(dense).s_ffn == 0.0


def test_bf16_model_forward(tiny_model):
    model = prunepath.moefy(tiny_model("qwen2"), neurons_per_expert=8, progress=False).to(torch.bfloat16)
    prunepath.configure(model, tau=0.6)
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 100, (1, 6))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
