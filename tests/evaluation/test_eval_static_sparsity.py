"""A Wanda-pruned (static, unstructured) model reports its weight sparsity as s_FFN, as the paper does."""

import pytest

from prunepath.baselines.wanda import apply_wanda
from prunepath.evaluation.perplexity import evaluate_perplexity
from test_eval_fixtures import random_text, tiny_llama, tiny_tokenizer


def test_wanda_weight_sparsity_is_reported_as_s_ffn(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama()
    data = tmp_path / "t.txt"
    data.write_text(random_text(400, seed=3))
    dense = evaluate_perplexity(model, tok, data, window=64, progress=False)
    assert dense["s_ffn"] == 0.0
    apply_wanda(model, tok, [random_text(200, seed=s) for s in range(5)], 0.4, max_tokens=256, seq_len=16,
                progress=False)
    pruned = evaluate_perplexity(model, tok, data, window=64, progress=False)
    assert pruned["s_ffn"] == pytest.approx(0.4, abs=0.02)
    assert pruned["s_ffn_kind"] == "weights (unstructured)"
    assert pruned["ppl"] != dense["ppl"]
