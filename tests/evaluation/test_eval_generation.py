"""ROUGE evaluation: greedy decoding equals transformers' greedy generate, ROUGE equals rouge-score's,
s_FFN is measured on the generated tokens."""

from __future__ import annotations

import json

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.evaluation.generation import evaluate_rouge, rouge_scores
from test_eval_fixtures import one_thread, tiny_converted, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rouge_scores_match_rouge_score_package():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    preds = ["the cat sat on the mat", "storms hit the coast", ""]
    refs = ["a cat was sitting on the mat", "a storm hit the north coast today", "nothing"]
    got = rouge_scores(preds, refs)
    sc = rs.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(sum(sc.score(r, p)[k].fmeasure for p, r in zip(preds, refs)) / 3)


def test_greedy_generation_and_decode_sparsity(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_converted(seed=8)
    prunepath.configure(model, tau=0.6)
    path = tmp_path / "x.jsonl"
    recs = [{"prompt": "w1 w2 w3 w4", "response": "w5 w6"}, {"prompt": "w7 w8", "response": "w9"},
            {"prompt": "w10", "response": "w11 w12"}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    res = evaluate_rouge(model, tok, path, max_new_tokens=6, progress=False)
    from prunepath.data.instruct import load_examples
    from prunepath.evaluation.generation import stop_ids

    stops = stop_ids(tok)
    assert set(stops) == {0, 1, 2, 3}  # EOS and every other special token of the tiny tokenizer
    preds, active = [], []
    for ex in load_examples(path):
        ids = tok(ex["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=stops, pad_token_id=0)
        gen = out[0, ids.shape[1]:].tolist()
        ends = [i for i, t in enumerate(gen) if t in stops]
        gen = gen[:ends[0]] if ends else gen
        preds.append(tok.decode(gen, skip_special_tokens=True).strip())
        # Reference decode statistics: every generated token but the last is fed back once.
        full = torch.tensor([ids[0].tolist() + gen])
        with torch.no_grad():
            model(input_ids=full)
        n_fed = max(len(gen) - 1, 0)
        if n_fed:
            active.append(torch.stack([f.last_active[0, ids.shape[1]:ids.shape[1] + n_fed].float()
                                       for f in prunepath.prunepath_modules(model)], 1))
    assert [s["prediction"] for s in res["samples"]] == preds
    assert res["rougeL"] == pytest.approx(rouge_scores(preds, [r["response"] for r in recs])["rougeL"])
    assert active, "the tiny model should generate more than one token for some prompt"
    act = torch.cat(active)
    assert res["tokens"] == act.shape[0]
    assert res["s_ffn"] == pytest.approx(1 - float(act.mean()) / 8, rel=1e-6)
    assert 0 <= res["prefill_s_ffn"] < 1 and res["examples"] == 3
    beam = evaluate_rouge(model, tok, path, max_new_tokens=4, num_beams=2, limit=1, progress=False)
    assert beam["examples"] == 1 and beam["num_beams"] == 2


def test_bad_input(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_converted()
    p = tmp_path / "e.jsonl"
    p.write_text("")
    with pytest.raises(PrunePathError, match="empty"):
        evaluate_rouge(model, tok, p, progress=False)
    with pytest.raises(PrunePathError, match=">= 1"):
        evaluate_rouge(model, tok, [{"prompt": "w1", "response": "w2"}], max_new_tokens=0, progress=False)


CHAT = "{% for m in messages %}<u> {{ m['content'] }} </u>{% endfor %}{% if add_generation_prompt %} <a>{% endif %}"


def test_chat_template_wraps_prompts_and_keeps_the_budget(tmp_path):
    """An instruct tokenizer's chat template wraps every prompt (auto), and long articles are still cut to fit."""
    from prunepath.evaluation.generation import _prompt_ids

    tok = tiny_tokenizer()
    tok.add_tokens(["<u>", "</u>", "<a>"], special_tokens=True)
    tok.chat_template = CHAT
    ex = {"prompt": "w1 w2 w3", "response": "w4"}
    want = tok("<u> w1 w2 w3 </u> <a>", add_special_tokens=False)["input_ids"]
    assert _prompt_ids(tok, ex, 64, bos=1, chat=True) == want  # no BOS: the template brings its own tokens
    assert _prompt_ids(tok, ex, 64, bos=None, chat=False) == tok("w1 w2 w3", add_special_tokens=False)["input_ids"]

    model = tiny_converted(seed=3)
    model.resize_token_embeddings(len(tok))
    res = evaluate_rouge(model, tok, [ex], max_new_tokens=3, progress=False)
    assert res["chat_template"] is True
    assert evaluate_rouge(model, tok, [ex], max_new_tokens=3, progress=False, chat_template=False)["chat_template"] is False
    tok.chat_template = None
    with pytest.raises(PrunePathError, match="no chat template"):
        evaluate_rouge(model, tok, [ex], max_new_tokens=3, progress=False, chat_template=True)


def _tiny_gpt2():
    """Absolute positions: left padding goes wrong here unless positions follow the attention mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).double().eval()
    prunepath.moefy(m, neurons_per_expert=8, progress=False, clustering="random")
    for ffn in prunepath.prunepath_modules(m):
        torch.nn.init.normal_(ffn.router.weight, std=1.0)
    return m


@pytest.mark.parametrize("tau", [None, 0.6])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_batch_rows_equal_their_batch_one_decode(tau, arch):
    """Left-padded batched greedy decoding gives each row its batch-1 tokens, and the meters count the same
    tokens (padding and finished rows left out), on float64 converted models and fresh random prompts."""
    from prunepath.evaluation.common import ActiveMeter
    from prunepath.evaluation.generation import greedy_batch

    model = tiny_converted(seed=11, dtype=torch.float64) if arch == "llama" else _tiny_gpt2()
    if tau is not None:
        prunepath.configure(model, tau=tau)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    prompts = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in (7, 2, 5, 1, 9)]
    # the end token: one that row 0 generates early and the fewest other rows generate, so that finished rows
    # sit in the batch beside running ones
    free = greedy_batch(model, prompts, 12, None)
    eos = min(free[0][1:5], key=lambda t: sum(t in r for r in free))
    single, pre1, dec1 = [], ActiveMeter(model), ActiveMeter(model)
    for p in prompts:
        single += greedy_batch(model, [p], 12, eos, prefill_meter=pre1, decode_meter=dec1)
    pre, dec = ActiveMeter(model), ActiveMeter(model)
    batched = greedy_batch(model, prompts, 12, eos, pad=0, prefill_meter=pre, decode_meter=dec)
    assert batched == single
    lengths = [len(r) for r in single]
    assert lengths[0] < 5 and max(lengths) > lengths[0], lengths  # row 0 ends at EOS while others go on
    assert pre.tokens == sum(len(p) for p in prompts)
    # what batch 1 feeds back: every generated token, but not the last one of a row cut at max_new_tokens
    assert dec.tokens == dec1.tokens == sum(n - (n == 12) for n in lengths)
    if tau is not None:
        assert dec.result()["s_ffn"] == pytest.approx(dec1.result()["s_ffn"], rel=1e-9)
        assert pre.result()["s_ffn"] == pytest.approx(pre1.result()["s_ffn"], rel=1e-9)
    # against transformers' greedy generate, one prompt at a time
    for p, got in zip(prompts, single):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
        assert got == (out[:out.index(eos)] if eos in out else out)
    with pytest.raises(PrunePathError, match="none of them empty"):
        greedy_batch(model, [[5], []], 3, eos)


def test_greedy_batch_stops_at_any_of_several_tokens():
    """With several stop tokens each row ends at the first of any of them; greedy tokens before it are unchanged."""
    from prunepath.evaluation.generation import greedy_batch

    model = tiny_converted(seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    prompts = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in (4, 6, 3)]
    free = greedy_batch(model, prompts, 10, None)
    stops = [free[0][2], free[1][3]]
    want = []
    for row in free:
        ends = [i for i, t in enumerate(row) if t in stops]
        want.append(row[:ends[0]] if ends else row)
    got = greedy_batch(model, prompts, 10, stops)
    assert got == want and len(got[0]) <= 2 and len(got[1]) <= 3
    assert greedy_batch(model, prompts, 10, stops[0]) == [r[:r.index(stops[0])] if stops[0] in r else r for r in free]
