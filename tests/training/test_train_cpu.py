"""Acceptance tests of the trainer on a tiny Llama on CPU (PAPER.md §4): loss weights act, the schedule reaches
τ_min with real sparsity, training beats the untrained converted model, resume is exact, bad input is caught."""

import copy
import json
import shutil

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.training.config import TrainConfig
from prunepath.training.losses import routing_terms
from prunepath.training.trainer import evaluate, train
from test_train_helpers import one_thread, tiny_llama, tiny_lm_data, tiny_tokenizer


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def converted(seed=0):
    return prunepath.moefy(tiny_llama(seed), neurons_per_expert=8, progress=False)


def cfg(**kw):
    base = dict(stage1_steps=6, stage2_steps=12, tau_min=0.5, tau_rounds=4, batch_size=4, seq_len=32,
                device="cpu", lr_backbone=1e-3, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def routing_stats(model, data):
    """Mean L_ent and L_bal of the routers over the evaluation rows."""
    ffns = prunepath.prunepath_modules(model)
    for f in ffns:
        f.capture_router_logits = True
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask")}
    model.eval()
    model(**batch)
    terms = [routing_terms(f.last_router_logits, batch["attention_mask"].bool()) for f in ffns]
    for f in ffns:
        f.capture_router_logits = False
    return {k: sum(float(t[k]) for t in terms) / len(terms) for k in ("ent", "bal")}


def test_entropy_and_balance_weights_act():
    data, ev = tiny_lm_data(), tiny_lm_data(n_docs=6, seed=7)
    runs = {}
    for name, eta, lam in (("plain", 0.0, 0.0), ("eta", 1.0, 0.0), ("eta+lam", 1.0, 1.0)):
        m = converted()
        train(m, None, data, cfg(eta=eta, lam=lam, lr_router=1e-2))
        runs[name] = routing_stats(m, ev)
    # Raising η lowers the mean routing entropy; raising λ (at that η) brings usage back towards balance.
    assert runs["eta"]["ent"] < runs["plain"]["ent"] - 0.05
    assert runs["eta+lam"]["bal"] < runs["eta"]["bal"]


def test_schedule_reaches_tau_min_sparse_and_beats_untrained(tmp_path):
    data, ev = tiny_lm_data(), tiny_lm_data(n_docs=6, seed=7)
    m = converted()
    untrained = copy.deepcopy(m)
    with prunepath.routing(untrained, tau=0.5):
        before = evaluate(untrained, ev, "lm")
    res = train(m, tiny_tokenizer(), data, cfg(), eval_data=ev, out_dir=tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 19))
    assert all(r["tau"] == 1.05 and r["s_ffn"] == 0 for r in log[:6])
    assert log[6]["tau"] == pytest.approx(1.0) and log[-1]["tau"] == pytest.approx(0.5)
    assert res.final_tau == pytest.approx(0.5) and log[-1]["s_ffn"] > 0
    assert {"loss", "task", "ent", "bal", "H", "lr", "tokens"} <= set(log[-1])
    after = res.eval
    assert after["tau"] == pytest.approx(0.5) and after["s_ffn"] > 0
    assert after["loss"] < before["loss"]
    # The output directory is a PrunePath checkpoint at τ_min that reproduces the trained model.
    loaded, tok = prunepath.load(tmp_path / "run")
    assert loaded.prunepath.config.routing.tau == pytest.approx(0.5) and tok is not None
    assert evaluate(loaded, ev, "lm")["loss"] == pytest.approx(after["loss"], rel=1e-5)


def test_resume_gives_the_same_final_weights(tmp_path):
    data = tiny_lm_data()
    c = cfg(stage1_steps=4, stage2_steps=8, save_every=6, lr_scheduler="linear", warmup_steps=2, grad_accum=2,
            max_grad_norm=0.5)
    a = converted()
    train(a, None, data, c, out_dir=tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step-0000006"
    assert (ckpt / "trainer_state.json").exists()
    # A fresh process would rebuild the model from scratch: use different initial weights to prove they
    # all come from the checkpoint.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoints" / ckpt.name)
    b = converted(seed=5)
    res = train(b, None, data, TrainConfig(**{**c.to_dict(), "resume": "auto"}), out_dir=tmp_path / "b")
    assert res.steps == 12
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log_b = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log_b == list(range(7, 13))


def test_existing_run_needs_resume(tmp_path):
    data = tiny_lm_data()
    train(converted(), None, data, cfg(stage1_steps=1, stage2_steps=1), out_dir=tmp_path / "r")
    with pytest.raises(PrunePathError, match="--resume"):
        train(converted(), None, data, cfg(stage1_steps=1, stage2_steps=1), out_dir=tmp_path / "r")


@pytest.mark.parametrize("bad,match", [
    (dict(tau_min=1.0), "tau-min"),
    (dict(tau_min=1.2), "tau-min"),
    (dict(task="summarize"), "unknown task"),
    (dict(stage1_steps=0, stage2_steps=0), "nothing to train"),
    (dict(tau_schedule="cosine"), "tau-schedule"),
])
def test_bad_settings(bad, match):
    with pytest.raises(PrunePathError, match=match):
        cfg(**bad)


def test_instruct_on_an_encoder_is_refused():
    from transformers import BertConfig, BertModel

    enc = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64))
    with pytest.raises(PrunePathError, match="encoder"):
        train(enc, None, tiny_lm_data(), cfg(task="instruct"))


def test_recipe_file_rejects_unknown_keys_and_flags_override(tmp_path):
    from prunepath.cli.main import build_parser
    from prunepath.cli.train import resolve_config

    good = tmp_path / "r.yaml"
    good.write_text("stage1_steps: 7\ntau_min: 0.6\neta: 0.01\n")
    args = build_parser().parse_args(["train", "--recipe", str(good), "--tau-min", "0.4", "--out", "x"])
    c = resolve_config(args)
    assert (c.stage1_steps, c.tau_min, c.eta, c.lam) == (7, 0.4, 0.01, 1e-3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage1_steps": 3, "tau_mim": 0.5}))
    with pytest.raises(PrunePathError, match="tau_mim"):
        TrainConfig.from_file(bad)
    with pytest.raises(PrunePathError, match="tau_mim"):
        resolve_config(build_parser().parse_args(["train", "--recipe", str(bad)]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(PrunePathError, match="--device cpu"):
        train(converted(), None, tiny_lm_data(), cfg(device="cuda"))


def test_inner_sparsity_training_logs_fraction_and_byte_sparsity(tmp_path):
    """--inner-sparsity-max: stage-2 steps run with batch thresholds at the scheduled fraction; the log records
    it, s_FFN counts the bytes they skip, and the finished model carries no training thresholds."""
    from prunepath.training.schedule import inner_fraction

    data = tiny_lm_data()
    m = converted()
    c = cfg(tau_schedule="sample", tau_all_prob=1.0, inner_sparsity_max=0.6, inner_off_prob=0.0)
    train(m, tiny_tokenizer(), data, c, out_dir=tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["inner"] == 0 and r["s_ffn"] == 0 for r in log[:6])  # stage 1: off
    for r in log[6:]:
        f = inner_fraction(2, r["step"] - 7, c)
        assert r["inner"] == pytest.approx(f) and r["tau"] == 1.05
        assert r["s_ffn"] == pytest.approx(f, abs=0.08)  # every expert on: (2f + f) / 3 of the bytes skipped
    assert all(f.inner_fraction is None for f in prunepath.prunepath_modules(m))
