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
    from prunepath.kernels.dense import GatedDense
    for plain in ("fused", "torch"):
        eng = DecodeEngine(model, batch=1, max_len=16, device="cpu", plain=plain)
        assert eng.ffn_mode == "dense" and all(l.prefill_ffn is None for l in eng.layers)
        if plain == "fused":
            assert all(isinstance(l.sparse, GatedDense) and not l.sparse.router for l in eng.layers)
        else:
            assert all(l.sparse is None for l in eng.layers)
        saved = [layer.ffn.router_w.clone() for layer in eng.layers]
        for layer in eng.layers:
            layer.ffn.router_w.fill_(float("nan"))  # any read of the router would turn the logits to NaN
        assert torch.equal(eng.generate(ids, 4), want), plain
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


def _greedy_hf(model, ids, n):
    out = ids
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, model(out).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return out[:, ids.shape[1]:]


def _set_thresholds_that_matter(model, ids, routing: dict, inner: dict) -> torch.Tensor:
    """Configure ``routing``, then the in-expert thresholds ``inner``; asserts they change the last logits and
    returns those logits (float32), the reference for the engine."""
    prunepath.configure(model, **routing)
    with torch.no_grad():
        plain = model(ids).logits[:, -1].float()
    prunepath.configure(model, inner=inner)
    with torch.no_grad():
        ref = model(ids).logits[:, -1].float()
    assert float((ref - plain).abs().max()) > 1e-3  # the thresholds change the model
    return ref


def test_in_expert_thresholds_decode_with_the_threshold_kernels():
    # an ungated checkpoint at τ > 1 with in-expert thresholds: batch 1 runs ThresholdFFN, batch 2 (at the
    # crossover) the masked dense FFN; both give the Hugging Face forward's tokens, and prefill its logits
    from prunepath.decoding.engine import DecodeEngine
    from prunepath.kernels.dense import GatedDense
    from prunepath.kernels.thresholds import ThresholdFFN
    model = _tiny_llama()
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(8))
    ref = _set_thresholds_that_matter(model, ids[:1], {"tau": 1.05, "gates": False},
                                      {"t_in": [0.5] * n, "t_mid": [0.02, None]})
    one = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert all(isinstance(l.sparse, ThresholdFFN) for l in one.layers)
    assert float((one.prefill(ids[:1]) - ref).abs().max()) < 2e-5
    assert torch.equal(one.generate(ids[:1], 4), _greedy_hf(model, ids[:1], 4))
    two = DecodeEngine(model, batch=2, max_len=16, device="cpu", crossover=2)
    assert all(isinstance(l.sparse, GatedDense) and l.thr is not None for l in two.layers)  # masked, fused
    assert torch.equal(two.generate(ids, 4), _greedy_hf(model, ids, 4))
    # new thresholds in place (same FFN objects); turning a layer off rebuilds it as the plain FFN
    kept = one.layers[0].sparse
    one.set_thresholds([0.3] * n, [0.01] * n)
    assert one.layers[0].sparse is kept and one.budget_thr[0].tolist() == pytest.approx([0.3, 0.01])
    prunepath.configure(model, inner={"t_in": [0.3] * n, "t_mid": [0.01] * n})
    assert torch.equal(one.generate(ids[:1], 3), _greedy_hf(model, ids[:1], 3))
    one.set_thresholds([None] * n, [None] * n)
    assert all(isinstance(l.sparse, GatedDense) and l.thr is None for l in one.layers)


@pytest.mark.parametrize("gates,tau", [(False, 0.8), (True, 0.8), (True, 1.05)])
def test_in_expert_thresholds_with_the_router_decode_inside_the_expert_kernels(gates, tau):
    # experts dropped (τ < 1) or scaled (gated) and entries skipped inside them: the expert kernels at batch 1,
    # the dense-equivalent path at the crossover, the legacy path and both prefills give the HF forward's output
    from prunepath.decoding.engine import DecodeEngine
    from prunepath.kernels.ffn import SparseFFN
    model = _tiny_llama()
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(11))
    ref = _set_thresholds_that_matter(model, ids[:1], {"tau": tau, "gates": gates},
                                      {"t_in": [0.4] * n, "t_mid": [0.02, None]})
    want1, want2 = _greedy_hf(model, ids[:1], 4), _greedy_hf(model, ids, 4)
    for prefill in ("dense", "grouped"):
        one = DecodeEngine(model, batch=1, max_len=16, device="cpu", prefill=prefill)
        mode = "sparse" if tau < 1 else "dense"  # every expert on (gated): the dense-equivalent path
        assert all(isinstance(l.sparse, SparseFFN) and l.sparse.mode == mode for l in one.layers)
        assert float((one.prefill(ids[:1]) - ref).abs().max()) < 2e-5
        assert torch.equal(one.generate(ids[:1], 4), want1)
    for ffn in ("dense_legacy", "sparse"):
        forced = DecodeEngine(model, batch=1, max_len=16, device="cpu", ffn=ffn)
        assert torch.equal(forced.generate(ids[:1], 4), want1)
    two = DecodeEngine(model, batch=2, max_len=16, device="cpu", crossover=2)
    assert all(l.sparse.mode == "dense" and l.thr is not None for l in two.layers)
    assert torch.equal(two.generate(ids, 4), want2)
    # thresholds changed in place, then off: still the HF forward's tokens
    one.set_thresholds([0.3] * n, [0.01] * n)
    prunepath.configure(model, inner={"t_in": [0.3] * n, "t_mid": [0.01] * n})
    assert torch.equal(one.generate(ids[:1], 3), _greedy_hf(model, ids[:1], 3))
    one.set_thresholds([None] * n, [None] * n)
    prunepath.configure(model, inner={})
    assert torch.equal(one.generate(ids[:1], 3), _greedy_hf(model, ids[:1], 3))


def test_tau_crosses_one_with_thresholds_set():
    # ungated at τ > 1 runs the threshold kernels; set_tau below 1 moves the same thresholds into the expert
    # kernels (and back), each time with the HF forward's tokens
    from prunepath.decoding.engine import DecodeEngine
    from prunepath.kernels.ffn import SparseFFN
    from prunepath.kernels.thresholds import ThresholdFFN
    model = _tiny_llama()
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(12))
    prunepath.configure(model, tau=1.05, gates=False, inner={"t_in": [0.5] * n, "t_mid": [0.02] * n})
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert all(isinstance(l.sparse, ThresholdFFN) for l in eng.layers)
    for tau in (0.7, 1.05):
        eng.set_tau(tau)
        prunepath.configure(model, tau=tau)
        kind = SparseFFN if tau < 1 else ThresholdFFN
        assert all(isinstance(l.sparse, kind) for l in eng.layers)
        assert torch.equal(eng.generate(ids, 4), _greedy_hf(model, ids, 4))


def test_bad_thresholds_are_named_errors():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny_llama()
    n = model.config.num_hidden_layers
    prunepath.configure(model, tau=1.05, gates=False, inner={"t_in": [0.5] * n, "t_mid": [0.02] * n})
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    with pytest.raises(prunepath.PrunePathError, match="one per layer"):
        eng.set_thresholds([0.1], [0.1])
    with pytest.raises(prunepath.PrunePathError, match=">= 0"):
        eng.set_thresholds([-0.1] * n, [None] * n)
    assert eng.budget_thr[0].tolist() == pytest.approx([0.5, 0.02])  # refused before any change


def test_teal_on_the_original_model_decodes_with_the_threshold_kernels():
    from transformers import LlamaConfig, LlamaForCausalLM
    from prunepath.baselines.activation import ActivationSparsity, apply_activation_sparsity
    from prunepath.decoding.engine import DecodeEngine
    from prunepath.kernels.thresholds import ThresholdFFN
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(9))
    dense = _greedy_hf(model, ids, 4)
    spec = ActivationSparsity(method="teal", target=0.4, allocation="uniform", t_in=[0.6, 0.6], t_mid=[0.02, 0.02])
    with torch.no_grad():
        plain = model(ids).logits[:, -1]
    apply_activation_sparsity(model, spec)
    want = _greedy_hf(model, ids, 4)
    with torch.no_grad():
        assert float((model(ids).logits[:, -1] - plain).abs().max()) > 1e-3  # the thresholds matter
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert all(isinstance(l.sparse, ThresholdFFN) for l in eng.layers)
    assert torch.equal(eng.generate(ids, 4), want)
    with torch.no_grad():
        assert float((eng.prefill(ids) - model(ids).logits[:, -1]).abs().max()) < 2e-5
    eng.set_thresholds([None, None], [None, None])  # off: the dense model's tokens
    assert torch.equal(eng.generate(ids, 4), dense)
    apply_activation_sparsity(model, ActivationSparsity(method="cats", target=0.3, allocation="uniform",
                                                        t_in=[None, None], t_mid=[0.1, 0.1]))
    with pytest.raises(prunepath.PrunePathError, match="not CATS"):
        DecodeEngine(model, batch=1, max_len=16, device="cpu")


@pytest.mark.parametrize("batch", [1, 2])
def test_plain_ffn_paths_agree_on_a_dense_model(batch):
    # an unconverted model: the fused plain FFN (GEMM, Triton act·up, GEMM into the residual) and PyTorch's ops
    # give the Hugging Face tokens; at batch 2 (above the crossover) TEAL thresholds run masked inside it
    from transformers import LlamaConfig, LlamaForCausalLM
    from prunepath.baselines.activation import ActivationSparsity, apply_activation_sparsity
    from prunepath.decoding.engine import DecodeEngine
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (batch, 6), generator=torch.Generator().manual_seed(11))
    engines = {p: DecodeEngine(model, batch=batch, max_len=16, device="cpu", plain=p) for p in ("fused", "torch")}
    for eng in engines.values():
        assert torch.equal(eng.generate(ids, 4), _greedy_hf(model, ids, 4))
    if batch > 1:
        spec = ActivationSparsity(method="teal", target=0.4, allocation="uniform", t_in=[0.6, 0.6],
                                  t_mid=[0.02, 0.02])
        apply_activation_sparsity(model, spec)
        want = _greedy_hf(model, ids, 4)
        for p in ("fused", "torch"):
            eng = DecodeEngine(model, batch=batch, max_len=16, device="cpu", plain=p)
            assert all(l.thr is not None for l in eng.layers)
            assert torch.equal(eng.generate(ids, 4), want), p
    with pytest.raises(prunepath.PrunePathError, match="plain must be one of"):
        DecodeEngine(model, batch=batch, max_len=16, device="cpu", plain="cublas")


def test_small_layers_run_the_dense_equivalent_path_at_batch_one():
    # below sparse_min_bytes per layer "auto" skips the sparse kernels even at batch 1 (launch-bound there);
    # "sparse" still forces them, and both give the Hugging Face tokens
    from prunepath.decoding.engine import SPARSE_MIN_BYTES, DecodeEngine
    model = _tiny_llama()
    prunepath.configure(model, tau=0.6)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(12))
    want = _greedy_hf(model, ids, 3)
    layer_bytes = DecodeEngine(model, batch=1, max_len=12, device="cpu").layers[0].ffn.nbytes()
    assert DecodeEngine(model, batch=1, max_len=12, device="cpu").ffn_mode == "sparse"  # CPU default: 0
    small = DecodeEngine(model, batch=1, max_len=12, device="cpu", sparse_min_bytes=layer_bytes + 1)
    at = DecodeEngine(model, batch=1, max_len=12, device="cpu", sparse_min_bytes=layer_bytes)
    forced = DecodeEngine(model, batch=1, max_len=12, device="cpu", sparse_min_bytes=layer_bytes + 1, ffn="sparse")
    assert (small.ffn_mode, at.ffn_mode, forced.ffn_mode) == ("dense", "sparse", "sparse")
    for eng in (small, at, forced):
        assert torch.equal(eng.generate(ids, 3), want)
    assert SPARSE_MIN_BYTES > layer_bytes  # a GPU default would run this tiny model dense-equivalent
    # in-expert thresholds keep the sparse kernels (dense-equivalent with thresholds measured 0.78x of them), and
    # switching them on / off moves the path both ways without changing the tokens' reference
    n = len(small.layers)
    small.set_thresholds([0.05] * n, [0.05] * n)
    assert small.ffn_mode == "sparse"
    prunepath.configure(model, tau=0.6, inner={"t_in": [0.05] * n, "t_mid": [0.05] * n})
    assert torch.equal(small.generate(ids, 3), _greedy_hf(model, ids, 3))
    small.set_thresholds([None] * n, [None] * n)
    assert small.ffn_mode == "dense"
    prunepath.configure(model, tau=0.6, inner={})
    with pytest.raises(prunepath.PrunePathError, match="sparse_min_bytes must be >= 0"):
        DecodeEngine(model, batch=1, max_len=12, device="cpu", sparse_min_bytes=-1)
