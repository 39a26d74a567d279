"""Classification metrics against scikit-learn, head and zero-shot predictions against direct references,
s_FFN on non-padding tokens, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prunepath
from prunepath.data.glue import GlueData
from prunepath.errors import PrunePathError
from prunepath.evaluation import classification as C
from test_eval_fixtures import N_WORDS, one_thread, tiny_converted, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 2, n), rng.integers(0, 2, n)) for n in (1, 5, 50, 333)]
    cases += [(np.ones(10, int), np.ones(10, int)), (np.zeros(10, int), np.ones(10, int)),
              (np.ones(10, int), rng.integers(0, 2, 10)), (np.zeros(8, int), np.zeros(8, int))]
    for p, y in cases:
        assert C.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p))
        assert C.binary_f1(p, y) == pytest.approx(sk.f1_score(y, p, zero_division=0.0))
        assert C.matthews_corr(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))
    p, y = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert C.matthews_corr(p, y) == pytest.approx(sk.matthews_corrcoef(y, p))
    m = C.classification_metrics([1, 0, 1], [1, 1, 1], "mrpc")
    assert set(m) == {"accuracy", "f1"} and set(C.classification_metrics([1], [1], "cola")) == {"accuracy", "mcc"}


def _words(g, n):
    return " ".join(f"w{i}" for i in torch.randint(0, N_WORDS, (n,), generator=g).tolist())


def tiny_bert_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, num_labels=2, pad_token_id=0)
    m = BertForSequenceClassification(cfg).eval()
    prunepath.moefy(m, neurons_per_expert=8, progress=False)
    with torch.no_grad():
        for f in prunepath.prunepath_modules(m):
            f.router.weight.normal_()
    prunepath.configure(m, tau=0.5)
    return m


def test_head_predictions_and_sparsity_match_unbatched_reference():
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = [(_words(g, int(torch.randint(2, 12, (1,), generator=g))), _words(g, 3)) for _ in range(13)]
    labels = torch.randint(0, 2, (13,), generator=g).tolist()
    data = GlueData("mrpc", texts, labels, 2)
    model = tiny_bert_classifier()
    res = C.evaluate_classification(model, tok, data, batch_size=4, progress=False)
    preds, active = [], []
    for a, b in texts:
        enc = tok(a, b, return_tensors="pt")
        with torch.no_grad():
            preds.append(int(model(**enc).logits.argmax(-1)))
        active.append(torch.stack([f.last_active.reshape(-1).float() for f in prunepath.prunepath_modules(model)], 1))
    act = torch.cat(active)  # [tokens, layers]
    assert res["predictions"] == preds and res["mode"] == "head"
    assert res["accuracy"] == pytest.approx(np.mean(np.array(preds) == np.array(labels)))
    assert res["f1"] == pytest.approx(C.binary_f1(preds, labels))
    assert res["tokens"] == act.shape[0]
    assert res["s_ffn"] == pytest.approx(1 - float(act.mean()) / 8, rel=1e-6)


def test_zero_shot_causal_lm(monkeypatch):
    tok = tiny_tokenizer()
    monkeypatch.setitem(C.PROMPTS, "sst2", ("{a} w1", (" w2", " w3")))
    model = tiny_converted(seed=4)
    g = torch.Generator().manual_seed(1)
    texts = [(_words(g, 2 + i % 5), None) for i in range(9)]
    data = GlueData("sst2", texts, [i % 2 for i in range(9)], 2)
    res = C.evaluate_classification(model, tok, data, batch_size=4, progress=False)
    ref = []
    for a, _ in texts:
        ids = tok(a + " w1", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
        ref.append(int(lp[tok.convert_tokens_to_ids("w3")] > lp[tok.convert_tokens_to_ids("w2")]))
    assert res["mode"] == "zero-shot" and res["predictions"] == ref
    assert res["accuracy"] == pytest.approx(np.mean(np.array(ref) == np.array(data.labels)))


def test_bad_input(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_bert_classifier()
    three = GlueData("sst2", [("w1", None)], [0], 3)
    with pytest.raises(PrunePathError, match="head has 2 labels"):
        C.evaluate_classification(model, tok, three, progress=False)
    p = tmp_path / "rte_dev.tsv"
    p.write_text("index\tsentence1\tlabel\n0\tx\tentailment\n")
    with pytest.raises(PrunePathError, match="missing column.*sentence2"):
        C.evaluate_classification(model, tok, p, progress=False)
    data = GlueData("sst2", [("w1", None)], [0], 2)
    with pytest.raises(PrunePathError, match="asked for"):
        C.evaluate_classification(model, tok, data, "cola", progress=False)
