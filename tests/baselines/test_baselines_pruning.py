"""Static baselines: Wanda (unstructured) and static expert pruning (structured), on tiny random models."""

import random

import pytest
import torch

import prunepath
from prunepath.baselines import apply_wanda, prepare, prune_experts, weight_sparsity
from prunepath.baselines.calibration import collect_ffn_inputs, token_batches
from prunepath.baselines.static import calibration_mass, experts_to_drop
from prunepath.baselines.wanda import input_norms, target_linears, wanda_mask
from conftest import word_tokenizer


def tiny_tokenizer():
    return word_tokenizer([f"w{i}" for i in range(98)] + ["[UNK]", "[EOS]"], split_punctuation=True,
                          unk_token="[UNK]", eos_token="[EOS]")


def random_texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(98)}" for _ in range(rng.randrange(10, 40))) for _ in range(n)]


# ---- Wanda -------------------------------------------------------------------------------------------------
def test_wanda_mask_per_row_sparsity_and_lowest_scores():
    torch.manual_seed(0)
    w = torch.randn(7, 40)
    norm = torch.rand(40) * 3
    for s in (0.0, 0.25, 0.5, 0.9):
        keep = wanda_mask(w, norm, s)
        n_drop = round(s * 40)
        assert (keep.logical_not().sum(1) == n_drop).all()
        score = w.abs().double() * norm.double()
        for row in range(7):
            dropped, kept = score[row][~keep[row]], score[row][keep[row]]
            if n_drop:
                assert dropped.max() <= kept.min()
    with pytest.raises(prunepath.PrunePathError):
        wanda_mask(w, norm, 1.0)


def test_wanda_uses_activation_norms_not_just_magnitude():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norm = torch.tensor([10.0, 1.0, 1.0, 0.1])  # scores 10, 2, 3, 0.4
    assert wanda_mask(w, norm, 0.5).tolist() == [[True, False, True, False]]


def test_apply_wanda_dense_model_ffn_scope(tiny_model):
    model = tiny_model("llama")
    attn_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    info = apply_wanda(model, tiny_tokenizer(), random_texts(30), 0.5, max_tokens=256, seq_len=16, progress=False)
    for name, m in target_linears(model, "ffn").items():
        assert "mlp" in name
        assert ((m.weight == 0).sum(1) == round(0.5 * m.weight.shape[1])).all()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, attn_before)
    assert model.prunepath.static_sparsity == pytest.approx(0.5) == info["sparsity"]
    assert weight_sparsity(model) == pytest.approx(0.5)


def test_apply_wanda_all_scope_skips_lm_head(tiny_model):
    model = tiny_model("gpt2")  # Conv1D weights are stored [in, out]
    head = model.lm_head.weight.clone()
    apply_wanda(model, tiny_tokenizer(), random_texts(30), 0.25, scope="all", max_tokens=256, seq_len=16,
                progress=False)
    mods = target_linears(model, "all")
    assert any("attn" in n for n in mods) and not any("lm_head" in n for n in mods)
    for m in mods.values():
        w = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
        assert ((w == 0).sum(1) == round(0.25 * w.shape[1])).all()
    assert torch.equal(model.lm_head.weight, head)


def test_wanda_norms_on_converted_model_are_the_ffn_input_norms(tiny_model):
    model = tiny_model("llama")
    prunepath.moefy(model, neurons_per_expert=8, progress=False)
    prunepath.configure(model, tau=0.3)  # calibration must still run dense
    tok = tiny_tokenizer()
    batches = token_batches(tok, random_texts(30), seq_len=16, max_tokens=256)
    mods = target_linears(model, "ffn")
    norms = input_norms(model, mods, batches, progress=False)
    xs = collect_ffn_inputs(model, batches, progress=False)
    up_names = [n for n in mods if n.endswith("up_proj")]
    for name, x in zip(up_names, xs):
        assert torch.allclose(norms[name].float(), x.double().norm(dim=0).float(), rtol=1e-5)
    assert model.prunepath.config.routing.tau == 0.3


# ---- static expert pruning ---------------------------------------------------------------------------------
def test_experts_to_drop_picks_least_mass():
    mass = [torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]
    off = experts_to_drop(mass, 0.5)
    assert off["0"] == [1, 3, 5]
    assert off["1"] == [3, 4, 5]  # ties: the higher index goes first
    always = [torch.tensor([False, True, False, False, False, False]), torch.zeros(6, dtype=torch.bool)]
    assert experts_to_drop(mass, 0.5, always)["0"] == [2, 3, 5]
    with pytest.raises(prunepath.PrunePathError):
        experts_to_drop(mass, 1.0)


def test_static_zero_equals_dense_and_half_drops_least_mass(tiny_model, tmp_path):
    dense = tiny_model("llama")
    ids = torch.randint(0, 98, (2, 13))
    ref = dense(input_ids=ids).logits
    model = tiny_model("llama")
    prunepath.moefy(model, neurons_per_expert=8, progress=False)
    tok, texts = tiny_tokenizer(), random_texts(30)
    prune_experts(model, tok, texts, 0.0, max_tokens=256, seq_len=16, progress=False)
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    assert prunepath.sparsity(model).s_ffn == 0.0

    mass = calibration_mass(model, tok, texts, max_tokens=256, seq_len=16, progress=False)
    off = prune_experts(model, tok, texts, 0.5, mass=mass, progress=False)
    out = model(input_ids=ids).logits
    assert prunepath.sparsity(model).s_ffn == pytest.approx(0.5)
    for layer, m in enumerate(mass):
        kept = [e for e in range(8) if e not in off[str(layer)]]
        assert m[off[str(layer)]].max() <= m[kept].min()
    # reference: zero the dropped experts' down-projection columns and run the all-expert model
    manual = tiny_model("llama")
    prunepath.moefy(manual, neurons_per_expert=8, progress=False)
    prunepath.configure(manual, rule="all", gates=False)
    with torch.no_grad():
        for layer, ffn in enumerate(prunepath.prunepath_modules(manual)):
            for e in off[str(layer)]:
                ffn.down_proj.weight[:, e * 8:(e + 1) * 8] = 0
    assert torch.allclose(out, manual(input_ids=ids).logits, atol=1e-5)
    prunepath.save(model, tmp_path / "static")
    loaded, _ = prunepath.load(tmp_path / "static")
    assert torch.allclose(loaded(input_ids=ids).logits, out, atol=1e-5)


def test_prepare_static_and_wanda_need_calibration(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(prunepath.PrunePathError, match="texts"):
        prepare(model, "wanda", sparsity=0.5)
    with pytest.raises(prunepath.PrunePathError, match="moefy"):
        prepare(model, "static", tokenizer=tiny_tokenizer(), texts=random_texts(5), sparsity=0.5)
