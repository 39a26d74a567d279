"""Engine FFN paths: batch crossover, prefill (dense-equivalent vs grouped), the step hook (interpreter, CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")

import prunepath  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    m.eval()
    prunepath.moefy(m, neurons_per_expert=8, progress=False, clustering="random")
    for ffn in prunepath.prunepath_modules(m):
        torch.nn.init.normal_(ffn.router.weight, std=1.0)
    return m


def test_crossover_picks_the_path_and_outputs_agree():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny_llama()
    prunepath.configure(model, tau=0.6)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                          pad_token_id=0)[:, 5:]
    below = DecodeEngine(model, batch=2, max_len=12, device="cpu", crossover=4)
    at = DecodeEngine(model, batch=2, max_len=12, device="cpu", crossover=2)
    assert below.ffn_mode == "sparse" and at.ffn_mode == "dense"
    assert torch.equal(below.generate(ids, 3), want)
    assert torch.equal(at.generate(ids, 3), want)
    legacy = DecodeEngine(model, batch=2, max_len=12, device="cpu", ffn="dense_legacy")
    assert legacy.ffn_mode == "dense_legacy" and torch.equal(legacy.generate(ids, 3), want)


def test_prefill_paths_match_the_model():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny_llama()
    prunepath.configure(model, tau=0.97)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits[:, -1].float()
    for mode in ("dense", "grouped"):
        eng = DecodeEngine(model, batch=1, max_len=16, device="cpu", prefill=mode)
        got = eng.prefill(ids)
        assert float((got - ref).abs().max()) < 2e-6, mode
    # τ changed in place reaches the prefill path too
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    prunepath.configure(model, tau=0.2)
    eng.sync_routing(model.prunepath.config.routing)
    with torch.no_grad():
        ref2 = model(ids).logits[:, -1].float()
    assert float((eng.prefill(ids) - ref2).abs().max()) < 2e-6
    assert float((ref2 - ref).abs().max()) > 1e-4  # τ matters (50x the tolerance)
    with pytest.raises(prunepath.PrunePathError, match="prefill"):
        DecodeEngine(model, batch=1, max_len=16, device="cpu", prefill="fast")


def test_step_hook_runs_every_step():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny_llama()
    prunepath.configure(model, tau=0.6)
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    calls = []
    eng.step_hook = lambda: calls.append(1)
    eng.generate(torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(6)), 5)
    assert len(calls) == 4  # the first token comes from prefill


def test_ungated_every_expert_runs_the_plain_ffn_without_the_router():
    # ungated experts at τ > 1: decode and prefill read no router (a router that raises proves it), outputs
    # equal Hugging Face's; τ below 1 rebuilds the routed path, and the router picks the experts again
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny_llama()
    prunepath.configure(model, tau=1.05, gates=False)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(7))

    def hf(n):  # greedy through the Hugging Face forward (generate() would stop at the config's EOS)
        out = ids
        with torch.no_grad():
            for _ in range(n):
                out = torch.cat([out, model(out).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return out[:, 6:]
    want = hf(4)
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert eng.ffn_mode == "dense" and all(l.sparse is None and l.prefill_ffn is None for l in eng.layers)
    saved = [layer.ffn.router_w.clone() for layer in eng.layers]
    for layer in eng.layers:
        layer.ffn.router_w.fill_(float("nan"))  # any read of the router would turn the logits to NaN
    assert torch.equal(eng.generate(ids, 4), want)
    for layer, w in zip(eng.layers, saved):
        layer.ffn.router_w.copy_(w)  # the packed router may share the model's storage
    eng2 = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    eng2.set_tau(0.6)
    prunepath.configure(model, tau=0.6)
    assert eng2.ffn_mode == "sparse" and all(l.sparse is not None for l in eng2.layers)
    assert torch.equal(eng2.generate(ids, 4), hf(4))
    prunepath.configure(model, tau=1.05, gates=True)  # gated: the router scales every expert, so it is read
    eng3 = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert all(l.sparse is not None for l in eng3.layers)
    assert torch.equal(eng3.generate(ids, 3), hf(3))
