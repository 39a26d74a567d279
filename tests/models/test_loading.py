"""Loading: the attention-implementation override every loader applies."""

import pytest
import torch

import prunepath
from prunepath import PrunePathError


def test_attention_override_reaches_plain_and_converted_models(tiny_model, tmp_path, monkeypatch):
    """$PRUNEPATH_ATTN_IMPL switches the attention of a plain model directory and of a PrunePath checkpoint (the
    study's every process loads through these two), leaves the function unchanged, and a bad value is an error
    naming the choices."""
    model = tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(tmp_path / "plain")
    converted = prunepath.moefy(tiny_model("llama"), neurons_per_expert=16, progress=False)
    prunepath.save(converted, tmp_path / "ckpt")
    ids = torch.randint(0, 100, (2, 9))

    monkeypatch.delenv("PRUNEPATH_ATTN_IMPL", raising=False)
    base, _ = prunepath.load_model(tmp_path / "plain")
    assert base.config._attn_implementation == "sdpa"
    ref = base(input_ids=ids).logits
    monkeypatch.setenv("PRUNEPATH_ATTN_IMPL", "eager")
    for path in ("plain", "ckpt"):
        m, _ = prunepath.load_model(tmp_path / path)
        assert m.config._attn_implementation == "eager"
    eager, _ = prunepath.load_model(tmp_path / "plain")
    torch.testing.assert_close(eager(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("PRUNEPATH_ATTN_IMPL", "fast-please")
    with pytest.raises(PrunePathError, match="eager, sdpa"):
        prunepath.load_model(tmp_path / "plain")
