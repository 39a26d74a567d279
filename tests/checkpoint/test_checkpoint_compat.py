"""Checkpoints saved before the issue-14 redesign still load and give the same numbers.

``tests/fixtures/ckpt-main-8de57bb-llama`` was saved by the code at the branch point (main 8de57bb; generated from main 2c22cfb, whose src/ is identical) from the tiny
random Llama of conftest (moefy 8 neurons per expert, seed 0, τ 0.7); ``…expected.pt`` holds its logits and
s_FFN on fixed ids, computed by that code."""

from pathlib import Path

import torch

import prunepath

DATA = Path(__file__).resolve().parents[1] / "fixtures"


def test_checkpoint_saved_by_the_branch_point_loads_with_the_same_outputs():
    expected = torch.load(DATA / "ckpt-main-8de57bb-llama.expected.pt")
    model, tok = prunepath.load(DATA / "ckpt-main-8de57bb-llama")
    assert tok is None
    assert model.prunepath.config.routing.tau == 0.7
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    torch.testing.assert_close(logits, expected["logits"])
    assert prunepath.sparsity(model).s_ffn == expected["s_ffn"]


def test_load_model_dispatches_to_the_checkpoint_loader():
    model, _ = prunepath.load_model(DATA / "ckpt-main-8de57bb-llama")
    assert prunepath.is_converted(model)


def test_what_prunepath_knows_about_a_model_is_one_object():
    """Loading sets model.prunepath (a PrunePathState), not loose attributes on the Hugging Face model."""
    model, _ = prunepath.load_model(DATA / "ckpt-main-8de57bb-llama")
    st = model.prunepath
    assert isinstance(st, prunepath.PrunePathState) and prunepath.state_of(model) is st
    assert st.config.num_experts == model.prunepath.config.num_experts and st.source.endswith("llama")
    loose = [k for k in vars(model) if k.startswith(("prunepath_", "_prunepath", "_display_name", "_source",
                                                      "_tokenizer", "_static_"))]
    assert loose == []
