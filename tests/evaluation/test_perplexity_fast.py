"""The fast perplexity path: LM head + loss only on scored positions (chunked), its structural/numeric guard,
bf16 evaluation, and the `--dtype` flag. Every fast result is checked against a direct reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import prunepath
from prunepath.cli.main import main
from prunepath.evaluation.perplexity import evaluate_perplexity, head_nll_sum, score_tokens, split_lm_head
from test_eval_fixtures import one_thread, random_text, save_tiny_llama, tiny_converted, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_head_nll_sum_matches_log_softmax_reference_across_chunks(dtype, bias):
    g = torch.Generator().manual_seed(7 + bias)
    n, d, v = 300, 24, 1000
    head = torch.nn.Linear(d, v, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g))
    hidden = torch.randn(n, d, generator=g).to(dtype)
    tgt = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        logits = head(hidden).double()  # the reference sees the same (possibly bf16-rounded) logits
    ref = -float(torch.log_softmax(logits, -1).gather(1, tgt[:, None]).sum())
    # 256-row GEMM blocks (2 blocks) or one; log-softmax on 1-row, 7-row or whole-block sub-blocks
    for chunk_bytes, softmax_bytes in ((1, 1), (4 * v * 256, 4 * v * 7), (1 << 30, 1 << 30), (1 << 30, 4 * v * 7)):
        with torch.no_grad():
            got = head_nll_sum(hidden, tgt, head, chunk_bytes=chunk_bytes, softmax_bytes=softmax_bytes)
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(ref, rel=1e-6)
    assert float(head_nll_sum(hidden[:0], tgt[:0], head)) == 0.0


def test_split_lm_head_accepts_plain_heads_and_rejects_softcapped_logits(tiny_model):
    probe = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(0))
    for arch in ("llama", "qwen2", "gpt2", "opt"):
        m = tiny_model(arch)
        split = split_lm_head(m, probe)
        assert split is not None, arch
        assert split[1] is m.get_output_embeddings()
    g = tiny_model("gemma3")
    g.config.final_logit_softcapping = 0.05  # logits = 0.05 tanh(z / 0.05): not the bare head's output
    assert split_lm_head(g, probe) is None
    g.config.final_logit_softcapping = None
    assert split_lm_head(g, probe) is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3"])
@pytest.mark.parametrize("window,stride", [(16, 16), (16, 6)])
def test_fused_and_full_logits_paths_agree_with_direct_reference(tiny_model, arch, window, stride):
    model = tiny_model(arch, seed=window + stride).double()
    if arch == "gemma3":
        model.config.final_logit_softcapping = 0.05  # forces the guarded fallback to the full logits
    ids = torch.randint(3, 101, (53,), generator=torch.Generator().manual_seed(stride))
    fast, n_fast = score_tokens(model, ids, window=window, stride=stride, bos_id=None, pad=0, batch_size=3,
                                progress=False)
    full, n_full = score_tokens(model, ids, window=window, stride=stride, bos_id=None, pad=0, batch_size=3,
                                progress=False, fused_head=False)
    # Direct reference: every token j >= 1 predicted from the protocol's context, one unbatched forward each.
    ref = 0.0
    for j in range(1, ids.numel()):
        k = 0 if j < window else (j - window) // stride + 1
        start = k * stride
        ctx = ids[max(start - 1, 0):j][None]
        with torch.no_grad():
            logits = model(input_ids=ctx).logits[0, -1].double()
        ref -= float(torch.log_softmax(logits, -1)[ids[j]])
    assert n_fast == n_full == ids.numel() - 1
    assert fast == pytest.approx(ref, rel=1e-9)
    assert full == pytest.approx(ref, rel=1e-9)


def test_converted_model_same_ppl_and_sparsity_on_both_paths_and_in_bf16():
    model = tiny_converted(seed=5)
    prunepath.configure(model, tau=0.6)
    ids = torch.randint(4, 64, (97,), generator=torch.Generator().manual_seed(11)).tolist()
    kw = dict(window=24, stride=10, batch_size=4, progress=False)
    fast = evaluate_perplexity(model, None, ids, **kw)
    full = evaluate_perplexity(model, None, ids, fused_head=False, **kw)
    assert fast["tokens"] == full["tokens"] == 96
    assert fast["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    assert fast["s_ffn"] == full["s_ffn"] and 0 < fast["s_ffn"] < 1
    assert fast["active_hist"] == full["active_hist"] and fast["dtype"] == "float32"
    # bf16: the same protocol runs, reports its dtype, and stays close to float32 (routing may flip on ties).
    model.to(torch.bfloat16)
    half = evaluate_perplexity(model, None, ids, **kw)
    half_full = evaluate_perplexity(model, None, ids, fused_head=False, **kw)
    assert half["dtype"] == "bfloat16" and half["tokens"] == 96
    assert math.isfinite(half["ppl"]) and half["ppl"] == pytest.approx(fast["ppl"], rel=0.05)
    assert half["ppl"] == pytest.approx(half_full["ppl"], rel=1e-5)
    assert half["s_ffn"] == pytest.approx(fast["s_ffn"], abs=0.05)


def test_cli_dtype_bf16_loads_and_reports_bfloat16(tmp_path):
    dense = save_tiny_llama(tmp_path / "dense", seed=4)
    text = tmp_path / "t.txt"
    text.write_text(random_text(300, seed=2))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    base = ["eval", "--model", str(dense), "--task", "ppl", "--data", str(text), "--window", "32", "--no-progress"]
    assert main(base + ["--json", str(a)]) == 0
    assert main(base + ["--dtype", "bf16", "--json", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["dtype"] == "float32" and rb["dtype"] == "bfloat16"
    assert ra["tokens"] == rb["tokens"] == 299
    assert rb["ppl"] == pytest.approx(ra["ppl"], rel=0.02) and rb["ppl"] != ra["ppl"]
    with pytest.raises(SystemExit):
        main(base + ["--dtype", "int8"])


def test_fused_head_uses_only_scored_rows(monkeypatch):
    """With stride < window the LM head sees exactly the scored positions (no context rows, no padding)."""
    model = tiny_llama(seed=2)
    ids = torch.randint(4, 64, (50,), generator=torch.Generator().manual_seed(3))
    seen = []
    real = F.cross_entropy

    def spy(logits, target, *a, **k):
        seen.append(logits.shape[0])
        return real(logits, target, *a, **k)

    monkeypatch.setattr("prunepath.evaluation.perplexity.F.cross_entropy", spy)
    _, n = score_tokens(model, ids, window=20, stride=5, bos_id=None, pad=0, batch_size=4, progress=False)
    assert sum(seen) == n == 49
