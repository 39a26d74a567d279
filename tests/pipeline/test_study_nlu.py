"""The NLU study on a tiny random BERT, a word tokenizer and tiny GLUE-style files: every method runs, records
carry the required fields, s_FFN rises as τ falls, the clustering ablation uses the pretrained permutations,
the deadline stops cleanly with valid JSON, and the recipe is validated."""

from __future__ import annotations

import json
import time

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.pipeline import nlu_study as N
from conftest import word_tokenizer
from test_eval_fixtures import one_thread  # noqa: F401

WORDS = [f"w{i}" for i in range(40)]
REQUIRED = ("task", "method", "variant", "s_ffn", "metric", "value", "tau", "eval_examples", "train_examples",
            "train_steps", "seed", "model")


pytestmark = pytest.mark.usefixtures("one_thread")


def _sent(g, n):
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def _write_data(root, n_train=24, n_dev=10):
    g = torch.Generator().manual_seed(0)
    lab = lambda: int(torch.randint(0, 2, (1,), generator=g))  # noqa: E731
    (root / "sst2").mkdir(parents=True)
    for name, n in (("stsa.binary.train", n_train), ("stsa.binary.dev", n_dev)):
        (root / "sst2" / name).write_text("".join(f"{lab()} {_sent(g, 6)}\n" for _ in range(n)))
    (root / "mrpc").mkdir()
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = "".join(f"{lab()}\t1\t2\t{_sent(g, 5)}\t{_sent(g, 5)}\n" for _ in range(n))
        (root / "mrpc" / name).write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + rows)
    (root / "rte").mkdir()
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = "".join(f"{i}\t{_sent(g, 5)}\t{_sent(g, 3)}\t{['entailment', 'not_entailment'][lab()]}\n"
                       for i in range(n))
        (root / "rte" / name).write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    (root / "cola").mkdir()
    for name, n in (("in_domain_train.tsv", n_train), ("in_domain_dev.tsv", n_dev)):
        (root / "cola" / name).write_text("".join(f"src\t{lab()}\t\t{_sent(g, 5)}\n" for _ in range(n)))


def _write_model(path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(path)
    tok = word_tokenizer(["[PAD]", "[UNK]"] + WORDS, pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(path)


@pytest.fixture
def setup(tmp_path):
    _write_data(tmp_path / "data")
    _write_model(tmp_path / "model")
    return tmp_path


def _recipe(tmp, **over):
    r = {"study": "nlu", "model": str(tmp / "model"), "display_name": "tiny-bert (random)",
         "data_dir": str(tmp / "data"), "out": str(tmp / "out"), "device": "cpu", "seq_len": 16, "batch_size": 4,
         "eval_batch_size": 8, "neurons_per_expert": 8, "dense": {"steps": 3, "warmup_steps": 0},
         "prunepath": {"stage1_steps": 2, "stage2_steps": 3, "tau_min": 0.5},
         "lte": {"stage1_steps": 2, "stage2_steps": 2, "thresholds": [0.3, 0.7]},
         "taus": [1.05, 0.9, 0.6, 0.3], "wanda": {"sparsities": [0.0, 0.5], "calib_tokens": 64},
         "max_train_examples": {"sst2": 16}}
    r.update(over)
    return r


def test_every_method_runs_and_records_are_complete(setup):
    res = N.run(_recipe(setup, tasks=["sst2", "mrpc", "cola"]), progress=False)
    assert res["failed"] == [] and res["skipped"] == []
    recs = json.loads((setup / "out" / N.RECORDS_NAME).read_text())
    assert recs == json.loads(json.dumps(res["records"]))
    for r in recs:
        for k in REQUIRED:
            assert k in r, (k, r["method"])
        assert r["metric"] == N.PRIMARY[r["task"]] and r["value"] == r[r["metric"]]
        assert 0.0 <= r["s_ffn"] <= 1.0 and r["seed"] == 0 and r["model"] == "tiny-bert (random)"
        assert r["eval_examples"] == 10
    methods = {(r["task"], r["method"], r["variant"]) for r in recs}
    for task in ("sst2", "mrpc", "cola"):
        for m, v in (("dense-finetuned", "finetuned"), ("prunepath", "finetuned"), ("prunepath-sweep", "finetuned"),
                     ("wanda", "ffn-unstructured"), ("prunepath-sweep", "pretrained"), ("prunepath", "pretrained")):
            assert (task, m, v) in methods
        assert any(t == task and m == "lte" for t, m, _ in methods)
    sst = [r for r in recs if r["task"] == "sst2"]
    assert all(r["train_examples"] == 16 and r["train_subsampled"] for r in sst)
    assert all(r["f1"] is not None for r in recs if r["task"] == "mrpc")
    assert all(r["mcc"] is not None for r in recs if r["task"] == "cola")
    dense = [r for r in recs if r["method"] == "dense-finetuned"]
    assert all(r["s_ffn"] == 0.0 and r["train_steps"] == 3 for r in dense)
    # s_FFN rises as τ falls (one checkpoint), and τ > 1 keeps every expert
    for task in ("sst2", "mrpc", "cola"):
        for variant in ("finetuned", "pretrained"):
            sweep = sorted((r for r in recs if r["task"] == task and r["method"] == "prunepath-sweep"
                            and r["variant"] == variant), key=lambda r: -r["tau"])
            s = [r["s_ffn"] for r in sweep]
            assert s[0] == 0.0 and all(b >= a for a, b in zip(s, s[1:])) and s[-1] > 0.0
    # Wanda at sparsity 0 equals the dense fine-tuned model; at 0.5 half the FFN weights are gone
    for task in ("sst2", "mrpc"):
        w = {r["wanda_sparsity"]: r for r in recs if r["task"] == task and r["method"] == "wanda"}
        d = next(r for r in dense if r["task"] == task)
        assert w[0.0]["accuracy"] == d["accuracy"] and w[0.5]["s_ffn"] == pytest.approx(0.5, abs=0.01)
    lte = [r for r in recs if r["method"] == "lte" and r["task"] == "sst2"]
    assert sorted(r["threshold"] for r in lte) == [0.3, 0.7]
    assert lte[0]["s_ffn"] <= lte[1]["s_ffn"]  # higher δ drops more experts
    md = N.render_markdown(recs)
    assert "**SST2**" in md and "prunepath-sweep" in md and "| mcc |" not in md.split("**COLA**")[0]
    png = N.plot_records(recs, setup / "img" / "nlu.png")
    assert png.stat().st_size > 1000
    # a re-run resumes: every unit is done, nothing retrains, records unchanged
    t = time.time()
    again = N.run(_recipe(setup, tasks=["sst2", "mrpc", "cola"]), progress=False)
    assert again["records"] == res["records"] and time.time() - t < 30


def test_pretrained_clustering_uses_the_pretrained_permutation(setup):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    pre = BertForSequenceClassification(cfg).eval()
    ft = BertForSequenceClassification(cfg).eval()  # other weights: the "fine-tuned" model
    perms = N.cluster_permutations(pre, 8)
    ids = torch.randint(0, 20, (3, 7))
    ref = ft(input_ids=ids).logits
    prunepath.moefy(ft, neurons_per_expert=8, clustering="kmeans-pretrained", permutations=perms, progress=False)
    prunepath.configure(ft, tau=1.05, gates=False)
    assert torch.allclose(ft(input_ids=ids).logits, ref, atol=1e-5)  # all experts, no gates: the dense model
    for f, p in zip(prunepath.prunepath_modules(ft), perms):
        assert torch.equal(f.neuron_index.cpu(), p)
    p2 = N.cluster_permutations(ft.__class__(cfg), 8)  # fresh weights cluster differently
    assert any(not torch.equal(a, b) for a, b in zip(perms, p2))
    with pytest.raises(PrunePathError, match="already converted"):
        prunepath.moefy(ft, neurons_per_expert=8, permutations=perms, progress=False)
    with pytest.raises(PrunePathError, match="2 FFN layers"):
        prunepath.moefy(ft.__class__(cfg), neurons_per_expert=8, permutations=perms[:1], progress=False)
    with pytest.raises(PrunePathError, match="not a permutation"):
        prunepath.moefy(ft.__class__(cfg), neurons_per_expert=8, permutations=[p.flip(0) % 31 for p in perms],
                        progress=False)


def test_deadline_stops_cleanly_with_valid_json(setup):
    out = setup / "out"
    # time for nothing: every unit is skipped, the record list is valid (empty) JSON, the skips are listed
    res = N.run(_recipe(setup, tasks=["rte", "cola"]), progress=False, deadline=time.time() + 1.0)
    assert json.loads((out / N.RECORDS_NAME).read_text()) == [] and res["records"] == []
    status = json.loads((out / "status.json").read_text())
    assert {s["unit"] for s in status["skipped"]} >= {"rte/dense", "cola/dense"}
    # a deadline that fits the first units but not the rest: a prefix of the priority order is done
    res = N.run(_recipe(setup, tasks=["rte"], deadline_margin_s=0.0, phases=["dense", "prunepath", "lte"],
                        lte={"stage1_steps": 100000, "stage2_steps": 1}), progress=False,
                deadline=time.time() + 600)
    units = {r["unit"] for r in json.loads((out / N.RECORDS_NAME).read_text())}
    assert units == {"rte/dense", "rte/prunepath"}
    assert any(s["unit"] == "rte/lte" for s in res["skipped"])


def test_a_failing_unit_is_logged_and_the_rest_goes_on(setup, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("wanda broke")

    monkeypatch.setattr("prunepath.baselines.wanda.apply_wanda", boom)
    res = N.run(_recipe(setup, tasks=["rte"], phases=["dense", "wanda", "prunepath"]), progress=False)
    assert [f["unit"] for f in res["failed"]] == ["rte/wanda"] and "wanda broke" in res["failed"][0]["error"]
    assert {r["unit"] for r in res["records"]} == {"rte/dense", "rte/prunepath"}
    with pytest.raises(RuntimeError, match="wanda broke"):
        N.run(_recipe(setup, tasks=["rte"], phases=["dense", "wanda"], continue_on_error=False), progress=False)


def test_recipe_validation(setup):
    for bad, msg in (({"bogus": 1}, "unknown setting"), ({"tasks": ["mnli"]}, "tasks must"),
                     ({"phases": ["lte"]}, "include 'dense'"), ({"taus": [0.5, -1]}, "taus"),
                     ({"wanda": {"sparsities": [1.0]}}, "wanda sparsities"), ({"lte": {"nope": 1}}, "unknown key"),
                     ({"study": "lm"}, "study must be"), ({"device": "tpu"}, "device must")):
        with pytest.raises(PrunePathError, match=msg):
            N.validate_recipe({**_recipe(setup), **bad})
    r = N.validate_recipe({"study": "nlu", "prunepath": {"tau_min": 0.5}})
    assert r["prunepath"]["tau_min"] == 0.5
    assert r["prunepath"]["stage2_steps"] == N.DEFAULTS["prunepath"]["stage2_steps"]
    with pytest.raises(PrunePathError, match="missing"):
        N.load_task({**r, "data_dir": str(setup / "nowhere")}, "sst2")


def test_cli_report_and_run(setup, capsys):
    import yaml

    rec = setup / "r.yaml"
    from prunepath.cli.main import main

    rec.write_text(yaml.safe_dump(_recipe(setup, tasks=["sst2"], phases=["dense", "prunepath"])))
    assert main(["nlu-study", str(rec), "--no-progress", "--out", str(setup / "o2")]) == 0
    path = setup / "o2" / N.RECORDS_NAME
    assert main(["nlu-study", "--report", str(path), "--plot", str(setup / "p.png")]) == 0
    assert "prunepath-sweep" in capsys.readouterr().out and (setup / "p.png").exists()
    rec.write_text(yaml.safe_dump({"study": "nlu", "taus": "x"}))
    assert main(["nlu-study", str(rec)]) == 2


def test_prunepath_run_dispatches_here(setup, capsys):
    import yaml

    from prunepath.cli.main import main

    rec = setup / "study-nlu-tiny.yaml"
    rec.write_text(yaml.safe_dump(_recipe(setup, tasks=["rte"], phases=["dense", "wanda"])))
    assert main(["run", str(rec), "--no-progress", "--out", str(setup / "o3")]) == 0
    recs = json.loads((setup / "o3" / N.RECORDS_NAME).read_text())
    assert {r["method"] for r in recs} == {"dense-finetuned", "wanda"}
    assert "**RTE**" in capsys.readouterr().out
