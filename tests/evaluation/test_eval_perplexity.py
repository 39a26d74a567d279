"""Perplexity protocol: exact NLL against a per-token reference, exact window/stride coverage, BOS, s_FFN on
the scored tokens, streaming tokenization, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.evaluation.perplexity import evaluate_perplexity, plan_windows, tokenize_text
from test_eval_fixtures import one_thread, random_text, tiny_converted, tiny_llama, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_nll(model, ids: list[int], window: int, stride: int, bos_id: int | None):
    """Direct reference: one unbatched forward per scored token, its context given by the protocol's formula."""
    n = len(ids)
    nll, count, active = 0.0, 0, []
    for j in range(0 if bos_id is not None else 1, n):
        k = 0 if j < window else (j - window) // stride + 1  # first window whose end is beyond j
        start = k * stride
        ctx = ([bos_id] + ids[start:j]) if bos_id is not None else ids[max(start - 1, 0):j]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx])).logits[0, -1].double()
        nll -= float(torch.log_softmax(logits, -1)[ids[j]])
        count += 1
        if prunepath.is_converted(model):
            active.append([float(f.last_active.reshape(-1)[-1]) for f in prunepath.prunepath_modules(model)])
    return nll, count, active


@pytest.mark.parametrize("n,window,stride", [(70, 16, 16), (70, 16, 5), (33, 16, 16), (16, 16, 16), (9, 16, 4),
                                             (48, 16, 8)])
def test_ppl_matches_per_token_reference(n, window, stride):
    model = tiny_llama(seed=n + stride, dtype=torch.float64)
    ids = torch.randint(4, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    res = evaluate_perplexity(model, None, ids, window=window, stride=stride, batch_size=3, progress=False)
    nll, count, _ = reference_nll(model, ids, window, stride, None)
    assert res["tokens"] == count == n - 1
    assert res["nll"] == pytest.approx(nll / count, rel=1e-10)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-10)
    assert res["s_ffn"] == 0.0 and res["window"] == window and res["stride"] == stride


@pytest.mark.parametrize("stride", [12, 7])
def test_ppl_with_bos_scores_every_token_and_sparsity_on_scored_tokens(stride):
    model = tiny_converted(seed=3, dtype=torch.float64)
    prunepath.configure(model, tau=0.6)
    tok = tiny_tokenizer()
    tok.add_bos_token = True  # the protocol prepends BOS to every window (Gemma-style)
    ids = torch.randint(4, 64, (41,), generator=torch.Generator().manual_seed(1)).tolist()
    res = evaluate_perplexity(model, tok, ids, window=12, stride=stride, batch_size=2, progress=False)
    nll, count, active = reference_nll(model, ids, 12, stride, tok.bos_token_id)
    assert res["bos"] is True and res["tokens"] == count == 41
    assert res["nll"] == pytest.approx(nll / count, rel=1e-10)
    a = torch.tensor(active)  # [tokens, layers]
    e = model.prunepath.config.num_experts
    assert res["per_layer_active"] == pytest.approx(a.mean(0).tolist(), rel=1e-12)
    assert res["s_ffn"] == pytest.approx(1 - float(a.mean()) / e, rel=1e-12)
    assert 0 < res["s_ffn"] < 1
    hist = torch.tensor(res["active_hist"])
    assert hist.shape == (2, e + 1) and int(hist.sum(1)[0]) == count
    assert (hist * torch.arange(e + 1)).sum(1).double().div(count).tolist() == pytest.approx(res["per_layer_active"])


@pytest.mark.parametrize("bos", [False, True])
def test_windows_cover_every_token_exactly_once(bos):
    for n in range(1, 60):
        for window in (1, 2, 5, 8, 16):
            for stride in sorted({1, 2, 3, window // 2 or 1, window}):
                if stride > window:
                    continue
                plan = plan_windows(n, window, stride, bos)
                scored = [t for s, e, f in plan for t in range(f, e)]
                assert scored == list(range(0 if bos else 1, n)), (n, window, stride)
                for s, e, f in plan:
                    assert s <= f < e <= min(s + window, n)
                # Full windows use all W tokens; only the last window may be partial.
                assert all(e - s == window for s, e, _ in plan[:-1])


def test_windows_reject_bad_stride():
    with pytest.raises(PrunePathError, match="stride"):
        plan_windows(10, 4, 5, False)
    with pytest.raises(PrunePathError, match="stride"):
        plan_windows(10, 4, 0, False)


def test_file_input_max_tokens_and_streaming(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "text.txt"
    path.write_text(random_text(900, seed=2))
    whole = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    from prunepath.evaluation.perplexity import iter_text_tokens
    streamed = [i for piece in iter_text_tokens(tok, path, block_chars=97) for i in piece]
    assert streamed == whole
    assert tokenize_text(tok, path, max_tokens=123).tolist() == whole[:123]
    assert [i for p in iter_text_tokens(tok, path, max_tokens=50, block_chars=64) for i in p] == whole[:50]
    model = tiny_llama(seed=5)
    a = evaluate_perplexity(model, tok, path, window=32, max_tokens=200, progress=False)
    b = evaluate_perplexity(model, tok, whole[:200], window=32, progress=False)
    assert a["tokens"] == b["tokens"] == 199 and a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)


def test_dense_and_all_experts_agree_and_report_sparsity():
    dense = tiny_llama(seed=7, dtype=torch.float64)
    ids = torch.randint(4, 64, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = evaluate_perplexity(dense, None, ids, window=20, progress=False)
    conv = tiny_llama(seed=7, dtype=torch.float64)
    prunepath.moefy(conv, neurons_per_expert=8, progress=False)
    prunepath.configure(conv, tau=1.05, gates=False)  # all experts, no gate scaling = the dense FFN
    res = evaluate_perplexity(conv, None, ids, window=20, progress=False)
    assert res["ppl"] == pytest.approx(ref["ppl"], rel=1e-9)
    assert res["s_ffn"] == 0.0 and res["mean_active"] == 8
    prunepath.configure(conv, tau=0.3, gates=True)
    assert evaluate_perplexity(conv, None, ids, window=20, progress=False)["s_ffn"] > 0.2


def test_bad_input(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PrunePathError, match="empty"):
        evaluate_perplexity(model, tok, empty, progress=False)
    with pytest.raises(PrunePathError, match="not found"):
        evaluate_perplexity(model, tok, tmp_path / "missing.txt", progress=False)
    with pytest.raises(PrunePathError, match="at least 2"):
        evaluate_perplexity(model, tok, [5], progress=False)
    # A tokenizer bigger than the model's embedding table is another model's tokenizer.
    small = tiny_llama(vocab=32)
    (tmp_path / "t.txt").write_text(random_text(50))
    with pytest.raises(PrunePathError, match="mismatch"):
        evaluate_perplexity(small, tok, tmp_path / "t.txt", progress=False)
    with pytest.raises(PrunePathError, match="outside the model's vocabulary"):
        evaluate_perplexity(small, tok, [5, 40, 7], progress=False)
