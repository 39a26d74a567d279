"""Plain-transformers loading: a PrunePath checkpoint of a gated-FFN model loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` in a process where prunepath cannot be
imported, with routing intact (τ, per-layer τ, gates, gate offset, always-on experts) and the logits of
``prunepath.load``."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import prunepath

IDS = torch.arange(2, 20).view(2, 9)

# Runs in a child: prunepath is made unimportable (its editable install included), then transformers alone loads
# every checkpoint, at its saved routing and at the τ values asked for, and writes the logits.
CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "prunepath" or name.startswith("prunepath."):
                raise ImportError("prunepath is not installed here")

    sys.meta_path.insert(0, Block())
    try:
        import prunepath  # noqa: F401
        raise SystemExit("prunepath is importable in the child")
    except ImportError:
        pass
    import torch
    import transformers

    jobs = json.loads(sys.argv[1])
    ids = torch.arange(2, 20).view(2, 9)
    out = {}
    for job in jobs:
        cls = getattr(transformers, job["auto"])
        model = cls.from_pretrained(job["dir"], trust_remote_code=True)
        assert "prunepath" not in type(model).__module__.split(".")[0], type(model).__module__
        assert not model.training
        for tau in [None] + job["taus"]:
            if tau is not None:
                model.prunepath_routing["tau"] = tau
            with torch.no_grad():
                o = model(input_ids=ids)
            out[f"{job['dir']}|{tau}"] = (o.logits, model.prunepath_sparsity())
    assert "prunepath" not in sys.modules
    torch.save(out, sys.argv[2])
""")


def _converted(tiny_model, arch, *, seed=0, always_on=True):
    model = prunepath.moefy(tiny_model(arch, seed), neurons_per_expert=8, progress=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking router, so that τ really selects different experts per token
        for f in prunepath.prunepath_modules(model):
            f.router.weight.copy_(torch.randn(f.router.weight.shape, generator=g))
        if always_on:
            prunepath.prunepath_modules(model)[0].always_on[3] = True
    return model


def _classifier(seed=0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return T.LlamaForSequenceClassification(cfg).eval()


def _run_child(jobs, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"), OMP_NUM_THREADS="1",
               TRANSFORMERS_VERBOSITY="error")
    res_path = tmp_path / "child.pt"
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, json.dumps(jobs), str(res_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(res_path)


def test_plain_transformers_loads_with_the_same_logits(tiny_model, tmp_path):
    cases = []  # (dir, auto class, runtime τ values)
    # Llama: all experts (τ 1.05) and sparse (τ 0.5, per-layer τ, gate offset, an always-on expert).
    m = _converted(tiny_model, "llama")
    prunepath.configure(m, tau=1.05)
    cases.append((prunepath.save(m, tmp_path / "llama-all"), "AutoModelForCausalLM", [0.5]))
    prunepath.configure(m, tau=0.5, gate_offset=1.5, layer_tau={1: 0.3})
    cases.append((prunepath.save(m, tmp_path / "llama-sparse"), "AutoModelForCausalLM", [0.8]))
    for arch in ("qwen2", "mistral", "gemma3"):
        m = _converted(tiny_model, arch, always_on=False)
        prunepath.configure(m, tau=0.6, rule="nucleus" if arch == "mistral" else "cumulative")
        cases.append((prunepath.save(m, tmp_path / arch), "AutoModelForCausalLM", [1.05]))
    m = prunepath.moefy(_classifier(), neurons_per_expert=8, progress=False)
    prunepath.configure(m, rule="topk", k=3, gates=False)
    cases.append((prunepath.save(m, tmp_path / "llama-cls"), "AutoModelForSequenceClassification", []))

    for path, auto, _ in cases:
        hf = json.loads((path / "config.json").read_text())
        assert hf["auto_map"] == {auto: "prunepath_hf.PrunePathModel"}
        assert "import prunepath" not in (path / "prunepath_hf.py").read_text()
    out = _run_child([{"dir": str(p), "auto": a, "taus": t} for p, a, t in cases], tmp_path)

    for path, _auto, taus in cases:
        ref, _ = prunepath.load(path)
        for tau in [None] + taus:
            with torch.no_grad(), prunepath.routing(ref, **({} if tau is None else {"tau": tau})):
                want = ref(input_ids=IDS).logits
                s_want = prunepath.sparsity(ref).s_ffn
            got, s_got = out[f"{path}|{tau}"]
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-5, (path.name, tau)
            assert s_got == pytest.approx(s_want, abs=1e-6), (path.name, tau)
    # The sparse checkpoints really are sparse there (routing is intact, not bypassed).
    assert out[f"{tmp_path / 'llama-sparse'}|None"][1] > 0.3
    assert out[f"{tmp_path / 'llama-all'}|None"][1] == 0.0


def test_unsupported_families_get_no_remote_code_and_resaves_stay_consistent(tiny_model, tmp_path):
    gpt2 = prunepath.moefy(tiny_model("gpt2"), neurons_per_expert=8, progress=False)
    path = prunepath.save(gpt2, tmp_path / "gpt2")
    hf = json.loads((path / "config.json").read_text())
    assert "auto_map" not in hf and "prunepath" not in hf and not (path / "prunepath_hf.py").exists()
    assert prunepath.load(path)[0].prunepath.config.adapter == "gpt2"

    m = _converted(tiny_model, "llama")
    path = prunepath.save(m, tmp_path / "llama")
    loaded, _ = prunepath.load(path)
    # The loaded model's config does not carry the remote-code entries along; a re-save writes them afresh.
    assert getattr(loaded.config, "prunepath", None) is None and not getattr(loaded.config, "auto_map", None)
    prunepath.configure(loaded, tau=0.42)
    prunepath.save(loaded, path)
    assert json.loads((path / "config.json").read_text())["prunepath"]["routing"]["tau"] == 0.42
    # A baseline's routing is not PrunePath's rule: the checkpoint is left to prunepath.load.
    prunepath.configure(loaded, method="static", params={})
    path = prunepath.save(loaded, tmp_path / "static")
    assert not (path / "prunepath_hf.py").exists() and "auto_map" not in json.loads((path / "config.json").read_text())
