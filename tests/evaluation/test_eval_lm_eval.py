"""lm-evaluation-harness adapter: the LM interface methods against direct references, and (when lm_eval is
installed) a round trip through lm_eval.simple_evaluate on a small local task."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prunepath
from prunepath.evaluation.lm_eval_adapter import HAVE_LM_EVAL, PrunePathLM
from prunepath.evaluation.perplexity import evaluate_perplexity
from test_eval_fixtures import one_thread, tiny_converted, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class Req:  # the part of lm_eval's Instance the adapter uses
    def __init__(self, *args):
        self.args = args


def direct_logprob(model, ids, n_cont):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    tgt = ids[-n_cont:]
    pos = range(len(ids) - n_cont - 1, len(ids) - 1)
    vals = [float(lp[p, t]) for p, t in zip(pos, tgt)]
    greedy = all(int(lp[p].argmax()) == t for p, t in zip(pos, tgt))
    return sum(vals), greedy


def test_loglikelihood_matches_direct_forward():
    tok = tiny_tokenizer()
    model = tiny_converted(seed=11, dtype=torch.float64)
    lm = PrunePathLM(model=model, tokenizer=tok, tau=0.7, batch_size=3)
    assert model.prunepath.config.routing.tau == 0.7
    reqs = [("w1 w2 w3", " w4"), ("w5", " w6 w7"), ("", " w8 w9"), ("w1 w2 w3 w4 w5 w6 w7 ", "w10")]
    got = lm.loglikelihood([Req(*r) for r in reqs], disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        c = tok(ctx.rstrip(), add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
        k = tok(cont, add_special_tokens=False)["input_ids"]
        ref_lp, ref_greedy = direct_logprob(model, c + k, len(k))
        assert lp == pytest.approx(ref_lp, rel=1e-9) and greedy == ref_greedy
    assert 0 < lm.sparsity()["s_ffn"] < 1


def test_loglikelihood_rolling_is_windowed_perplexity():
    tok = tiny_tokenizer()
    model = tiny_converted(seed=12, dtype=torch.float64)
    lm = PrunePathLM(model=model, tokenizer=tok, max_length=16, batch_size=2)
    text = " ".join(f"w{i % 50}" for i in range(37))
    (got,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    ref = evaluate_perplexity(model, None, ids, window=16, progress=False)
    assert ref["tokens"] == 37 and got == pytest.approx(-ref["nll_sum"], rel=1e-12)
    # With a window covering everything, it is one forward: the sum of next-token log-probs.
    lm.max_length = 64
    (whole,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    assert whole == pytest.approx(direct_logprob(model, ids, 37)[0], rel=1e-9)


def test_generate_until_stops_at_stop_string():
    tok = tiny_tokenizer()
    model = tiny_converted(seed=13)
    lm = PrunePathLM(model=model, tokenizer=tok, max_gen_toks=8)
    ctx = "w1 w2 w3"
    ids = tok(ctx, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=0, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    text = tok.decode(full)
    (free,) = lm.generate_until([Req(ctx, {"until": ["<never>"]})], disable_tqdm=True)
    assert free == text.split(tok.eos_token)[0]
    words = free.split()
    if len(words) >= 2:
        (cut,) = lm.generate_until([Req(ctx, {"until": [words[1]]})], disable_tqdm=True)
        assert cut == free[:free.find(words[1])]


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-evaluation-harness (lm_eval) not installed")
def test_round_trip_through_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    from prunepath.evaluation.lm_eval_adapter import run_lm_eval

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        q = " ".join(f"w{int(x)}" for x in torch.randint(0, 50, (4,), generator=g))
        rows.append({"question": q, "choices": ["w51", "w52", "w53"], "answer": i % 3})
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "toy.yaml").write_text(
        "task: prunepath_toy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\ntarget_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n")
    tok = tiny_tokenizer()
    model = tiny_converted(seed=14)
    prunepath.configure(model, tau=0.6)
    res = run_lm_eval(model, tok, ["prunepath_toy"], include_path=str(tmp_path), batch_size=4,
                      include_defaults=False)
    lm = PrunePathLM(model=model, tokenizer=tok)
    expected = []
    for r in rows:
        scores = lm.loglikelihood([Req(r["question"], " " + c) for c in r["choices"]], disable_tqdm=True)
        expected.append(int(max(range(3), key=lambda j: scores[j][0]) == r["answer"]))
    assert res["acc"] == pytest.approx(sum(expected) / len(expected))
    assert 0 < res["s_ffn"] < 1 and res["tokens"] > 0 and math.isfinite(res["acc"])
