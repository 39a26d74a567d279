"""Real pretrained weights from the offline registry (downloaded once into the user cache)."""

import pytest
import torch

import prunepath

pytestmark = pytest.mark.real_model

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side.")


@pytest.fixture(scope="module")
def smollm2():
    model, tok = prunepath.load_model("smollm2-135m")
    return model, tok


def test_smollm2_conversion_is_exact_and_tau_controls_sparsity(smollm2, tmp_path):
    model, tok = smollm2
    assert model.prunepath.display_name == "SmolLM2-135M-Instruct (Q4_1, dequantised)"
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    prunepath.moefy(model, neurons_per_expert=32, progress=False)
    cfg = model.prunepath.config
    assert (cfg.num_layers, cfg.num_experts) == (30, 48)
    s_values = []
    with torch.no_grad():
        prunepath.configure(model, rule="all", gates=False)
        assert (model(input_ids=ids).logits - dense).abs().max() <= 1e-4
        prunepath.configure(model, rule="cumulative", gates=True)
        for tau in (1.05, 0.9, 0.7, 0.5, 0.3, 0.1):
            prunepath.configure(model, tau=tau)
            model(input_ids=ids)
            s_values.append(prunepath.sparsity(model).s_ffn)
    assert s_values[0] == 0.0
    assert all(b > a for a, b in zip(s_values, s_values[1:])), s_values
    prunepath.configure(model, tau=0.6)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    path = prunepath.save(model, tmp_path / "smol", tokenizer=tok)
    loaded, tok2 = prunepath.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)
    assert tok2(TEXT).input_ids == tok(TEXT).input_ids


def test_minilm_conversion_is_exact():
    model, tok = prunepath.load_model("minilm-l6")
    batch = tok([TEXT, "A short one."], return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
        prunepath.moefy(model, neurons_per_expert=32, progress=False)
        prunepath.configure(model, rule="all", gates=False)
        conv = model(**batch).last_hidden_state
    assert (conv - dense).abs().max() <= 1e-4
