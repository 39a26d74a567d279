"""Checks on the real SmolLM2-135M (cached offline model; a few thousand tokens at most)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import prunepath
from prunepath.evaluation.perplexity import evaluate_perplexity, iter_text_tokens

pytestmark = pytest.mark.real_model
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def smollm2():
    return prunepath.load_model("smollm2-135m")


@pytest.mark.skipif(not (SHARED / "wikitext-2").exists(), reason="shared data folder not present")
def test_one_window_equals_transformers_loss(smollm2):
    model, tok = smollm2
    res = evaluate_perplexity(model, tok, SHARED / "wikitext-2" / "wiki.valid.raw", window=256, max_tokens=256,
                              progress=False)
    ids = tok((SHARED / "wikitext-2" / "wiki.valid.raw").read_text()[:20000], add_special_tokens=False,
              return_tensors="pt")["input_ids"][:, :256]
    with torch.inference_mode():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert res["tokens"] == 255 and res["bos"] is False and res["s_ffn"] == 0
    assert res["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert 5 < res["ppl"] < 100


@pytest.mark.skipif(not (SHARED / "xsum-sample").exists(), reason="shared data folder not present")
def test_streaming_tokenization_equals_whole_file(smollm2, tmp_path):
    _, tok = smollm2
    docs = [json.loads(line)["document"] for line in open(SHARED / "xsum-sample" / "xsum_sample.jsonl")][:8]
    text = "\n".join(docs) + "\n"
    p = tmp_path / "docs.txt"
    p.write_text(text)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    pieces = list(iter_text_tokens(tok, p, block_chars=1500))
    assert len(pieces) > 3 and [i for piece in pieces for i in piece] == whole
