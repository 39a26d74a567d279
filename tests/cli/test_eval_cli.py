"""`prunepath eval / sweep / plot` end to end on tiny local models, and clear errors (exit code 2)."""

from __future__ import annotations

import csv
import json

import pytest

import prunepath
from prunepath.cli.main import main
from test_eval_fixtures import one_thread, random_text, save_tiny_llama, tiny_converted, tiny_llama, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    tok = tiny_tokenizer()
    ckpt = root / "ckpt"
    prunepath.save(tiny_converted(seed=21), ckpt, tokenizer=tok)
    dense = save_tiny_llama(root / "dense", seed=21)
    text = root / "text.txt"
    text.write_text(random_text(700, seed=3))
    return {"root": root, "ckpt": str(ckpt), "dense": str(dense), "text": str(text)}


def test_eval_ppl_json(files, capsys):
    out = files["root"] / "r.json"
    rc = main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
               "--stride", "32", "--tau", "0.5", "--json", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert {"ppl", "tokens", "s_ffn", "window", "stride", "tau", "model", "meta"} <= set(r)
    assert r["window"] == 64 and r["stride"] == 32 and r["tau"] == 0.5 and 0 < r["s_ffn"] < 1
    model, tok = prunepath.load_model(files["ckpt"])
    prunepath.configure(model, tau=0.5)
    api = prunepath.evaluation.evaluate_perplexity(model, tok, files["text"], window=64, stride=32, progress=False)
    assert r["ppl"] == pytest.approx(api["ppl"], rel=1e-6) and r["tokens"] == api["tokens"]
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(r["ppl"])


def test_eval_dense_reports_zero_sparsity(files):
    out = files["root"] / "d.json"
    assert main(["eval", "--model", files["dense"], "--task", "ppl", "--data", files["text"], "--max-tokens",
                 "300", "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["s_ffn"] == 0 and r["tokens"] == 299 and r["converted"] is False


def test_routing_overrides_gates_off_all_experts_equals_dense(files, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--gates", "off",
                 "--tau", "1.05", "--window", "64", "--json", str(a), "--no-progress"]) == 0
    assert main(["eval", "--model", files["dense"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--json", str(b), "--no-progress"]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["routing"]["gates"] is False and ra["s_ffn"] == 0
    assert ra["ppl"] == pytest.approx(rb["ppl"], rel=1e-5)


def test_eval_target_sparsity(files):
    out = files["root"] / "t.json"
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--target-sparsity", "0.5", "--calib-tokens", "512", "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["calibration"]["within_tol"] and abs(r["calibration"]["s_ffn"] - 0.5) <= 0.01
    assert r["tau"] == r["calibration"]["tau"] and abs(r["s_ffn"] - 0.5) < 0.05


def test_eval_recon_and_classify(files, tmp_path):
    out = tmp_path / "rec.json"
    assert main(["eval", "--model", files["ckpt"], "--task", "recon", "--data", files["text"], "--max-tokens",
                 "128", "--ks", "1,2,8", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["k"] for r in rows] == [1, 2, 8] and rows[0]["mse"] > rows[1]["mse"] >= rows[2]["mse"]
    glue = tmp_path / "sst2.tsv"
    glue.write_text("sentence\tlabel\n" + "".join(f"w{i} w{i + 1}\t{i % 2}\n" for i in range(10)))
    out2 = tmp_path / "cls.json"
    assert main(["eval", "--model", files["ckpt"], "--task", "classify", "--data", str(glue), "--json", str(out2),
                 "--no-progress"]) == 0
    r = json.loads(out2.read_text())
    assert r["task"] == "sst2" and r["examples"] == 10 and 0 <= r["accuracy"] <= 1 and r["mode"] == "zero-shot"


def test_sweep_and_plot(files, tmp_path):
    out = tmp_path / "sw"  # a directory, like `prunepath run`'s
    rc = main(["sweep", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
               "--max-tokens", "400", "--taus", "1.05,0.3,0.6,0.9", "--dense", files["dense"], "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["frontier.png", "results.csv", "results.json", "results.md"]
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["tau"] for r in rows] == [0.3, 0.6, 0.9, 1.05]
    assert all(a["s_ffn"] >= b["s_ffn"] for a, b in zip(rows, rows[1:])) and rows[-1]["s_ffn"] == 0
    assert all(r["tokens"] == 399 for r in rows) and res["dense"]["s_ffn"] == 0
    table = list(csv.DictReader(open(out / "results.csv")))
    assert len(table) == 5 and float(table[0]["tau"]) == 0.3 and "ppl" in table[0]
    assert (out / "results.md").read_text().count("\n| ") >= 5 and (out / "frontier.png").stat().st_size > 1000
    assert main(["plot", str(out / "results.json"), str(out), "--labels", "a,b", "--out",
                 str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--model", "{ckpt}", "--task", "ppl", "--data", "{text}", "--taus", "0,0.5", "--out", "{root}/x"],
     "every τ must be in"),
    (["sweep", "--model", "{ckpt}", "--task", "ppl", "--data", "{text}", "--taus", "0.5,3", "--out", "{root}/x"],
     "every τ must be in"),
    (["sweep", "--model", "{dense}", "--task", "ppl", "--data", "{text}", "--taus", "0.5", "--out", "{root}/x"],
     "dense model"),
    (["eval", "--model", "{ckpt}", "--task", "ppl", "--data", "{root}/nope.txt"], "not found"),
    (["eval", "--model", "{ckpt}", "--task", "ppl"], "needs --data"),
    (["eval", "--model", "{dense}", "--task", "ppl", "--data", "{text}", "--tau", "0.5"], "converted model"),
    (["eval", "--model", "{ckpt}", "--task", "ppl", "--data", "{text}", "--target-sparsity", "1.5"], r"\[0, 1\)"),
    (["eval", "--model", "{ckpt}", "--task", "ppl", "--data", "{root}/empty.txt"], "empty"),
    (["eval", "--model", "{ckpt}", "--task", "mrpc", "--data", "{root}/bad_mrpc.tsv"], "missing column"),
    (["eval", "--model", "{small}", "--task", "ppl", "--data", "{text}", "--tokenizer", "{dense}"], "mismatch"),
])
def test_cli_errors(files, capsys, argv, message):
    root = files["root"]
    (root / "empty.txt").write_text("")
    (root / "bad_mrpc.tsv").write_text("Quality\t#1 String\n1\tx\n")
    small = root / "small"
    if not small.exists():
        tiny_llama(vocab=32).save_pretrained(small)
    subs = {**files, "small": str(small)}
    argv = [a.format(**subs) for a in argv] + ["--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and __import__("re").search(message, err), err
