"""The decode engine (Triton kernels under TRITON_INTERPRET=1, eager, fp32) against Hugging Face generate."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest
import torch

pytest.importorskip("triton")

import prunepath  # noqa: E402
from prunepath.errors import PrunePathError  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels in Triton's CPU interpreter", allow_module_level=True)


def _tiny(kind: str, convert: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    m.eval()
    if convert:
        prunepath.moefy(m, neurons_per_expert=8, progress=False, clustering="random")
        for ffn in prunepath.prunepath_modules(m):
            torch.nn.init.normal_(ffn.router.weight, std=1.0)
    return m


def _hf_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_engine_greedy_matches_hf(kind):
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny(kind)
    prunepath.configure(model, tau=0.6)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    want = _hf_greedy(model, ids, 5)
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert eng.ffn_mode == "sparse"
    got = eng.generate(ids, 5)
    assert torch.equal(got, want)
    # τ changes without rebuilding the layer FFNs (a captured graph would be reused).
    sparse_objs = [l.sparse for l in eng.layers]
    prunepath.configure(model, tau=0.3)
    eng.sync_routing(model.prunepath.config.routing)
    assert [l.sparse for l in eng.layers] == sparse_objs
    assert float(eng.layers[0].sparse.router.tau) == pytest.approx(0.3)
    assert torch.equal(eng.generate(ids, 4), _hf_greedy(model, ids, 4))


def test_tau_lives_in_one_per_model_tensor_and_set_tau_leaves_the_model_alone():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny("llama")
    prunepath.configure(model, tau=0.6, layer_tau={1: 0.4})
    eng = DecodeEngine(model, batch=1, max_len=16, device="cpu")
    assert eng.routing is not model.prunepath.config.routing
    for mode in ("sparse", "dense"):
        eng.set_ffn_mode(mode)
        ptr = eng.budget_tau.data_ptr()
        for i, layer in enumerate(eng.layers):  # decode and prefill FFNs read the layer's entry of one tensor
            for ffn in (layer.sparse, layer.prefill_ffn):
                assert ffn.tau_tensor.data_ptr() == ptr + 4 * i and ffn.k_tensor.data_ptr() == \
                    eng.budget_k.data_ptr() + 4 * i
        assert eng.budget_tau.tolist() == pytest.approx([0.6, 0.4])
        eng.set_tau(0.3, layer_tau={}, k=5)
        assert eng.budget_tau.tolist() == pytest.approx([0.3, 0.3]) and eng.budget_k.tolist() == [5, 5]
        assert float(eng.layers[1].sparse.tau_tensor) == pytest.approx(0.3)
        r = model.prunepath.config.routing  # the model's settings are untouched
        assert r.tau == 0.6 and r.layer_tau == {1: 0.4} and r.k is None
        eng.sync_routing(r)
    assert eng.budget_tau.tolist() == pytest.approx([0.6, 0.4])


def test_engine_dense_batch2_and_unconverted():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny("llama")
    prunepath.configure(model, tau=0.7)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    want = _hf_greedy(model, ids, 4)
    for mode in ("sparse", "dense"):
        eng = DecodeEngine(model, batch=2, max_len=12, device="cpu", ffn=mode)
        assert torch.equal(eng.generate(ids, 4), want), mode
    plain = _tiny("gpt2", convert=False)
    eng = DecodeEngine(plain, batch=1, max_len=12, device="cpu")
    assert eng.ffn_mode == "dense"
    assert torch.equal(eng.generate(ids[:1], 4), _hf_greedy(plain, ids[:1], 4))


def test_engine_sampling_is_seeded_and_in_vocab():
    from prunepath.decoding.engine import DecodeEngine
    model = _tiny("llama")
    prunepath.configure(model, tau=0.8)
    eng = DecodeEngine(model, batch=1, max_len=12, device="cpu")
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    a = eng.generate(ids, 5, temperature=1.0)
    torch.manual_seed(5)
    b = eng.generate(ids, 5, temperature=1.0)
    assert torch.equal(a, b) and a.shape == (1, 5) and int(a.max()) < 64


def _tokenizer():
    from conftest import word_tokenizer

    return word_tokenizer([f"w{i}" for i in range(63)] + ["[UNK]"], split_punctuation=True, unk_token="[UNK]")


def test_generate_api_and_cli(tmp_path, capsys, monkeypatch):
    from prunepath.cli.main import main
    from prunepath.decoding import generate
    model = _tiny("llama")
    prunepath.configure(model, tau=0.7)
    tok = _tokenizer()
    prompt = "w1 w2 w3 w4"
    fast = generate(model, tok, prompt, 4, kernels="triton", device="cpu")
    slow = generate(model, tok, prompt, 4, kernels="torch", device="cpu", quiet=True)
    assert fast == slow and len(fast.split()) >= 1
    # tau given per call; the model's own setting is restored afterwards
    generate(model, tok, prompt, 2, tau=0.4, kernels="triton", device="cpu")
    assert model.prunepath.config.routing.tau == pytest.approx(0.7)
    path = tmp_path / "ckpt"
    prunepath.save(model, path, tokenizer=tok)
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "3", "--tau", "0.5"]) == 0
    out = capsys.readouterr()
    assert "pure-PyTorch path" in out.err and out.out.strip()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--kernels", "triton"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(PrunePathError, match="--device cuda"):
        generate(model, tok, prompt, 2, kernels="triton", device="cpu")


def test_graph_warmups_share_one_stream_per_device(monkeypatch):
    # a new stream per capture would leave a new cuBLAS workspace behind each time (held memory grows)
    from prunepath.decoding import engine as eng_mod

    made = []

    class FakeStream:
        def __init__(self, device=None):
            made.append(device)

    monkeypatch.setattr(eng_mod, "_WARMUP_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    a = eng_mod.warmup_stream("cuda:0")
    assert eng_mod.warmup_stream("cuda") is a and eng_mod.warmup_stream(torch.device("cuda", 0)) is a
    b = eng_mod.warmup_stream("cuda:1")
    assert b is not a and eng_mod.warmup_stream("cuda:1") is b
    assert made == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_teal_model_generates_through_the_threshold_kernels(tmp_path, capsys, kind):
    # a TEAL model saved beside its thresholds, loaded again, decodes with the engine's threshold FFN and gives
    # the PyTorch path's text (gated Llama and plain GPT-2 with biases)
    from prunepath.baselines.activation import ActivationSparsity, save_activation_model
    from prunepath.cli.main import main
    from prunepath.decoding import generate
    from prunepath.kernels.thresholds import ThresholdFFN
    model = _tiny(kind, convert=False)
    spec = ActivationSparsity(method="teal", target=0.4, allocation="uniform", t_in=[0.5, 0.5], t_mid=[0.02, 0.02])
    path = save_activation_model(model, _tokenizer(), tmp_path / "teal", spec)
    loaded, tok = prunepath.load_model(str(path))
    prompt = "w1 w2 w3 w4"
    fast = generate(loaded, tok, prompt, 4, kernels="triton", device="cpu")
    slow = generate(loaded, tok, prompt, 4, kernels="torch", device="cpu", quiet=True)
    assert fast == slow
    engines = list(loaded.prunepath.engines.values())
    assert engines and all(isinstance(l.sparse, ThresholdFFN) for l in engines[0].layers)
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "4", "--kernels", "triton",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == fast.strip()


def test_generate_cli_calibrates_in_expert_thresholds_and_decodes_them(tmp_path, capsys):
    from prunepath.cli.main import main
    model = _tiny("llama")
    prunepath.configure(model, tau=1.05, gates=False)  # ungated at τ > 1: the threshold kernels' case
    path = tmp_path / "ckpt"
    prunepath.save(model, path, tokenizer=_tokenizer())
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % 63}" for i in range(700)))
    args = ["generate", "--model", str(path), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "4",
            "--inner-sparsity", "0.4", "--calib-data", str(calib), "--calib-tokens", "256"]
    assert main(args + ["--kernels", "triton"]) == 0
    fast = capsys.readouterr()
    assert "in-expert thresholds (uniform) for fraction 0.4" in fast.err and fast.out.strip()
    assert main(args + ["--kernels", "torch"]) == 0
    assert capsys.readouterr().out == fast.out  # the engine's threshold kernels and the PyTorch path agree
    assert main(args[:-4] + ["--inner-sparsity", "0.4"]) == 2  # no --calib-data
    assert "--calib-data" in capsys.readouterr().err
    dense = _tiny("llama", convert=False)
    dense.save_pretrained(tmp_path / "dense")
    _tokenizer().save_pretrained(tmp_path / "dense")
    assert main(["generate", "--model", str(tmp_path / "dense"), "--prompt", "w1", "--inner-sparsity", "0.4",
                 "--calib-data", str(calib)]) == 2
    assert "prunepath baseline --method teal" in capsys.readouterr().err
