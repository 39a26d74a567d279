"""Options beyond the paper (gate offset, router warm start, always-on experts, per-layer budgets, co-activation
experts, frozen backbone), dense fine-tuning, and the classification / instruction tasks — on tiny models."""

import json

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.training import calibration as cal
from prunepath.training.config import TrainConfig
from prunepath.training.trainer import evaluate, prepare_model, train
from test_train_helpers import one_thread, tiny_llama, tiny_lm_data, tiny_tokenizer


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def cfg(**kw):
    base = dict(stage1_steps=2, stage2_steps=4, tau_min=0.5, tau_rounds=2, batch_size=4, seq_len=32,
                device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_gate_offset_scales_gates_and_is_saved(tmp_path):
    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    train(m, tiny_tokenizer(), tiny_lm_data(), cfg(gate_offset=4.0), out_dir=tmp_path / "o")
    ffn = prunepath.prunepath_modules(m)[0]
    x = torch.randn(5, 32)
    w, mask = ffn.expert_weights(x)
    assert float(w.detach()[mask].min()) > 0.9  # sigmoid(logit + 4) ≈ 0.98 for small logits
    loaded, _ = prunepath.load(tmp_path / "o")
    assert loaded.prunepath.config.routing.gate_offset == 4.0


def oracle_overlap(model, data, k=2):
    """Fraction of each token's top-k router experts that are also among its top-k experts by true output norm."""
    ffns = prunepath.prunepath_modules(model)
    batches = cal.calibration_batches(data, 256)
    xs = cal.collect_ffn_inputs(model, ffns, batches)
    hits = []
    with torch.no_grad():
        for f, x in zip(ffns, xs):
            c = cal.expert_contributions(f, x)
            top_true = c.topk(k, -1).indices
            top_router = f.router(x).topk(k, -1).indices
            hits.append((top_true.unsqueeze(-1) == top_router.unsqueeze(-2)).any(-1).float().mean())
    return float(torch.stack(hits).mean())


def test_router_warmstart_learns_the_oracle_ranking():
    data = tiny_lm_data()
    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    before = oracle_overlap(m, data)  # zero router: ties → always experts 0..k-1
    kl = cal.router_warmstart(m, cal.calibration_batches(data, 512), steps=150, lr=5e-2, progress=False)
    after = oracle_overlap(m, data)
    assert after > before + 0.2 and after > 0.6
    assert all(k >= 0 for k in kl)
    # The backbone is untouched.
    fresh = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    assert torch.equal(prunepath.prunepath_modules(m)[0].up_proj.weight,
                       prunepath.prunepath_modules(fresh)[0].up_proj.weight)


def test_always_on_and_dense_layers_via_prepare_model():
    data = tiny_lm_data()
    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    c = cfg(always_on=1, auto_dense_layers=1, warmstart_steps=5, calib_tokens=256)
    info = prepare_model(m, c, data, progress=False)
    ffns = prunepath.prunepath_modules(m)
    assert all(int(f.always_on.sum()) == 1 for f in ffns)
    assert [f.always_on.nonzero().item() for f in ffns] == [ids[0] for ids in info["always_on"]]
    assert len(info["layer_sensitivity"]) == 2 and len(c.dense_layers) == 1
    assert len(info["warmstart_kl"]) == 2
    # Always-on experts run for every token even at a tiny τ; the dense layer keeps every expert.
    res = train(m, None, data, c.__class__(**{**c.to_dict(), "always_on": 0, "auto_dense_layers": 0,
                                             "warmstart_steps": 0, "tau_min": 0.05}), eval_data=data)
    dense_layer = c.dense_layers[0]
    st = prunepath.sparsity(m)
    assert st.per_layer_s_ffn[dense_layer] == 0.0
    assert st.per_layer_active[1 - dense_layer] >= 2.0 - 1e-6  # rank-0 expert + the always-on one
    assert res.eval["s_ffn"] > 0


def test_coactivation_conversion_and_collection():
    data = tiny_lm_data()
    m = tiny_llama()
    acts = cal.collect_ffn_activations(m, cal.calibration_batches(data, 200), max_tokens=200)
    assert len(acts) == 2 and acts[0].shape[1] == 64 and 150 <= acts[0].shape[0] <= 200
    # Reference: the dense MLP's own intermediate activations for the same inputs.
    mlp = m.model.layers[0].mlp
    xs = cal.collect_ffn_inputs(m, [mlp], cal.calibration_batches(data, 200))[0][:200]
    ref = mlp.act_fn(mlp.gate_proj(xs)) * mlp.up_proj(xs)
    assert torch.allclose(acts[0], ref, atol=1e-5)
    prepare_model(m, cfg(clustering="coactivation", calib_tokens=200, neurons_per_expert=8), data, progress=False)
    assert m.prunepath.config.clustering == "coactivation" and m.prunepath.config.num_experts == 8


def test_freeze_backbone_trains_routers_only():
    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, None, tiny_lm_data(), cfg(freeze_backbone=True, eta=0.1))
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".router." in k for k in changed)


def test_train_scope_ffn_leaves_attention_embeddings_and_norms():
    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, None, tiny_lm_data(), cfg(train_scope="ffn", lr_backbone=1e-2, eta=0.1))
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".router." in k for k in changed)
    assert any(".mlp." in k and ".router." not in k for k in changed)  # the experts train
    assert all(".mlp." in k for k in changed), sorted(changed)  # nothing outside the FFNs moved


def test_dense_finetuning_saves_a_plain_model(tmp_path):
    m = tiny_llama()
    before = m.model.layers[0].mlp.up_proj.weight.clone()
    res = train(m, tiny_tokenizer(), tiny_lm_data(), cfg(method="dense", lr_backbone=1e-3), out_dir=tmp_path / "d")
    assert not prunepath.is_converted(m) and res.final_tau is None
    assert not torch.equal(before, m.model.layers[0].mlp.up_proj.weight)
    loaded, _ = prunepath.load_model(str(tmp_path / "d"))
    assert not prunepath.is_converted(loaded)
    with pytest.raises(PrunePathError, match="unconverted"):
        train(prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False), None, tiny_lm_data(),
              cfg(method="dense"))


def test_plain_model_is_converted_first():
    m = tiny_llama()
    train(m, None, tiny_lm_data(), cfg(neurons_per_expert=16))
    assert prunepath.is_converted(m) and m.prunepath.config.num_experts == 4


def test_classification_with_a_new_head_on_an_encoder():
    from transformers import BertConfig, BertForSequenceClassification

    from prunepath.training.data import encode_classification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    tok = tiny_tokenizer()
    texts = [("the cat sat", None), ("the dog ran", None)] * 16
    labels = [0, 1] * 16
    ds = encode_classification(texts, labels, tok, 8)
    before = evaluate(prunepath.moefy(model, neurons_per_expert=8, progress=False), ds, "classify")
    res = train(model, tok, ds, cfg(task="classify", seq_len=8, lr_backbone=3e-3, stage1_steps=10,
                                    stage2_steps=10, tau_min=0.8), eval_data=ds)
    assert res.eval["accuracy"] == 1.0 and before["accuracy"] <= 0.5 + 1e-9
    assert "s_ffn" in res.eval


def test_instruct_task_trains_on_the_response_only():
    from prunepath.data.lm import build_instruct_dataset

    tok = tiny_tokenizer()
    ex = [{"prompt": "the cat", "response": "sat on the mat"}, {"prompt": "a dog", "response": "ran under a log"}]
    ds = build_instruct_dataset(ex * 8, tok, 16, template="{prompt} .")
    m = prunepath.moefy(tiny_llama(), neurons_per_expert=8, progress=False)
    before = evaluate(m, ds, "instruct")["loss"]
    res = train(m, tok, ds, cfg(task="instruct", seq_len=16, lr_backbone=3e-3, stage1_steps=10, stage2_steps=5),
                eval_data=ds)
    assert res.eval["tokens"] == sum(int((ds[i]["labels"][1:] != -100).sum()) for i in range(len(ds)))
    assert res.eval["loss"] < before - 1.0


def test_cli_end_to_end(tmp_path):
    from prunepath.cli.main import main

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "train.txt"
    from test_train_helpers import synthetic_docs
    text.write_text("\n\n".join(synthetic_docs(40)))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--task", "lm", "--data", str(text), "--out", str(out),
               "--stage1-steps", "2", "--stage2-steps", "3", "--tau-min", "0.6", "--seq-len", "16",
               "--batch-size", "2", "--neurons-per-expert", "16", "--device", "cpu", "--no-progress"])
    assert rc == 0
    loaded, tok = prunepath.load(out)
    assert loaded.prunepath.config.num_experts == 4 and loaded.prunepath.config.routing.tau == pytest.approx(0.6)
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "train_result.json").read_text())["steps"] == 5
    # Bad input through the CLI: a clear message and exit status 2.
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(["train", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "x"),
                 "--seq-len", "16", "--device", "cpu"]) == 2
    assert main(["train", "--model", str(model_dir), "--data", str(text), "--out", str(tmp_path / "y"),
                 "--tau-min", "1.0"]) == 2


def test_missing_label_column_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("prunepath.data.glue")
    from prunepath.cli.main import main
    from transformers import BertConfig, BertModel

    enc_dir = tmp_path / "enc"
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(enc_dir)
    tiny_tokenizer().save_pretrained(enc_dir)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tscore\nthe cat sat\t1\n")
    assert main(["train", "--model", str(enc_dir), "--task", "classify", "--glue-task", "sst2", "--data",
                 str(tsv), "--out", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "missing column" in capsys.readouterr().err
