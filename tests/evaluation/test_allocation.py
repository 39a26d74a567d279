"""Per-layer τ allocation for a target s_FFN (prunepath.evaluation.allocation) and its CLI."""

from __future__ import annotations

import json

import pytest
import torch

import prunepath
from prunepath.errors import PrunePathError
from prunepath.evaluation.allocation import (allocate_layer_tau, apply_allocation, greedy_path,
                                             layer_error_table)
from prunepath.evaluation.calibration import find_tau_for_sparsity
from test_eval_fixtures import one_thread, random_text, tiny_converted, tiny_llama, tiny_tokenizer  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n, seed=0):
    return torch.randint(4, 64, (n,), generator=torch.Generator().manual_seed(seed))


def _model(seed=2, layers=3, dtype=torch.float32):
    # routers of moderate confidence (logit sd ≈ 1), as after training; sd 1.0 weights make the softmax nearly
    # one-hot, where s_FFN jumps inside τ ∈ [0.99999, 1)
    return tiny_converted(seed=seed, layers=layers, router_std=0.2, dtype=dtype)


@pytest.mark.parametrize("target", [0.3, 0.55, 0.8])
def test_greedy_reaches_target_and_the_routing_gives_it(target):
    model = _model()
    ids = _ids(1024, seed=5)
    res = allocate_layer_tau(model, None, ids, target, window=64, progress=False)
    assert res["within_tol"] and abs(res["s_ffn"] - target) <= 0.01
    assert set(res["layer_tau"]) == {0, 1, 2} and res["method"] == "greedy" and res["tokens"] == 1024
    assert model.prunepath.config.routing.layer_tau == {}  # left as it was
    apply_allocation(model, res)
    from prunepath.evaluation.allocation import _run_windows
    with torch.no_grad():
        again = _run_windows(model, ids, 64, None, 0)
    assert again["s_ffn"] == pytest.approx(res["s_ffn"], abs=1e-12)
    assert again["per_layer_s_ffn"] == pytest.approx(res["per_layer_s_ffn"], abs=1e-12)


def test_untrained_zero_router_checkpoint():
    model = tiny_llama(seed=4, layers=3)
    prunepath.moefy(model, neurons_per_expert=8, progress=False)  # zero routers: uniform probabilities
    res = allocate_layer_tau(model, None, _ids(512, seed=1), 0.5, window=64, progress=False)
    assert res["within_tol"] and abs(res["s_ffn"] - 0.5) <= 0.01


def test_error_table_equals_brute_force_float64():
    model = _model(seed=7, dtype=torch.float64)
    prunepath.configure(model, gate_offset=1.5)
    grid = [1.05, 0.9, 0.7, 0.5, 0.3, 0.1, 1e-6]
    g = torch.Generator().manual_seed(3)
    for ffn in prunepath.prunepath_modules(model):
        x = torch.randn(3, 50, 32, generator=g, dtype=torch.float64)  # fresh inputs, chunked in the table
        table = layer_error_table(ffn, x, grid, chunk=37)
        with torch.no_grad(), prunepath.routing(model, tau=1.05):
            dense = ffn(x)
        for j, tau in enumerate(grid):
            with torch.no_grad(), prunepath.routing(model, tau=tau):
                y = ffn(x)
                s = 1 - ffn.last_active.double().mean().item() / ffn.num_experts
            ref = float(((y - dense) ** 2).sum() / (dense ** 2).sum())
            assert table["s_ffn"][j] == pytest.approx(s, abs=1e-12)
            assert table["rel_error"][j] == pytest.approx(ref, rel=1e-9, abs=1e-15)
        assert table["rel_error"][0] == 0 and table["tokens"] == 150


def test_error_table_with_always_on_and_gates_off():
    model = _model(seed=8, dtype=torch.float64)
    ffn = prunepath.prunepath_modules(model)[1]
    ffn.always_on[[2, 5]] = True
    prunepath.configure(model, gates=False, rule="nucleus")
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = [1.05, 0.6, 0.2, 1e-6]
    table = layer_error_table(ffn, x, grid)
    with torch.no_grad(), prunepath.routing(model, tau=1.05):
        dense = ffn(x)
    for j, tau in enumerate(grid):
        with torch.no_grad(), prunepath.routing(model, tau=tau):
            y = ffn(x)
        assert table["rel_error"][j] == pytest.approx(float(((y - dense) ** 2).sum() / (dense ** 2).sum()),
                                                      rel=1e-9, abs=1e-15)
    assert table["s_ffn"][-1] == pytest.approx(1 - 3 / 8)  # top-1 plus the two always-on experts


def test_more_sensitive_layer_keeps_more_experts():
    model = tiny_llama(seed=3, layers=3)
    prunepath.moefy(model, neurons_per_expert=8, progress=False)  # untrained: zero routers rank by index
    ffn = prunepath.prunepath_modules(model)[1]
    with torch.no_grad():
        # layer 1: the experts dropped first carry most of the output, so every dropped expert costs far more
        # there than in the other layers (whose s_FFN-vs-τ curves are the same: τ values are comparable)
        w = ffn.down_proj.weight.view(32, 8, 8)
        w[:, 4:] *= 10.0
    res = allocate_layer_tau(model, None, _ids(1024, seed=6), 0.5, window=64, progress=False)
    lt, s = res["layer_tau"], res["per_layer_s_ffn"]
    assert res["within_tol"]
    assert lt[1] > max(lt[0], lt[2]) and s[1] < min(s[0], s[2])


def test_greedy_path_takes_the_cheapest_slope():
    s = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    err = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.1, 5.0]])
    # layer 1 first (0.2 per unit), then layer 0 — whose best later point is its last one at the same slope as
    # the next (2.0), so the smaller step is taken —, then layer 0 again, then layer 1's expensive step
    assert greedy_path(s, err) == [(1, 0, 1), (0, 0, 1), (0, 1, 2), (1, 1, 2)]
    # a non-convex curve: the step to the far point is cheaper per unit than the near one
    assert greedy_path(torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[0.0, 1.0, 1.2]])) == [(0, 0, 2)]


def test_layer_tau_survives_save_load_with_identical_logits(tmp_path):
    model = _model(seed=5)
    res = allocate_layer_tau(model, None, _ids(512, seed=2), 0.5, window=64, progress=False)
    prov = apply_allocation(model, res, calibration="unit-test ids")
    ids = _ids(40, seed=9)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    prunepath.save(model, tmp_path / "ckpt")
    loaded, _ = prunepath.load(tmp_path / "ckpt")
    r = loaded.prunepath.config.routing
    assert r.layer_tau == res["layer_tau"] and r.allocation == prov and prov["method"] == "greedy"
    assert prov["target"] == 0.5 and prov["tokens"] == 512 and prov["calibration"] == "unit-test ids"
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert torch.equal(before, after)
    # an older checkpoint (no allocation field) still loads, with an empty allocation
    cfg_path = tmp_path / "ckpt" / "prunepath_config.json"
    meta = json.loads(cfg_path.read_text())
    del meta["routing"]["allocation"]
    cfg_path.write_text(json.dumps(meta))
    old, _ = prunepath.load(tmp_path / "ckpt")
    assert old.prunepath.config.routing.allocation == {} and old.prunepath.config.routing.layer_tau == r.layer_tau
    # the routing context manager restores the allocation
    with prunepath.routing(loaded, layer_tau={}, allocation={}):
        assert loaded.prunepath.config.routing.allocation == {}
    assert loaded.prunepath.config.routing.allocation == prov


def test_uniform_equals_the_bisection():
    model = _model(seed=4)
    ids = _ids(768, seed=3)
    res = allocate_layer_tau(model, None, ids, 0.45, method="uniform", window=64, progress=False)
    cal = find_tau_for_sparsity(model, None, ids, 0.45, max_tokens=768, window=64, progress=False)
    assert set(res["layer_tau"].values()) == {cal["tau"]} and res["tau"] == cal["tau"]
    assert res["s_ffn"] == pytest.approx(cal["s_ffn"], abs=1e-12) and res["within_tol"]


def test_texts_and_bad_inputs():
    tok = tiny_tokenizer()
    model = _model(seed=6)
    texts = [random_text(300, seed=i) for i in range(4)]
    res = allocate_layer_tau(model, tok, texts, 0.4, window=64, progress=False)
    assert res["within_tol"] and res["tokens"] > 64
    ids = _ids(512)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(PrunePathError, match=r"\(0, 1\)"):
            allocate_layer_tau(model, None, ids, bad, progress=False)
    with pytest.raises(PrunePathError, match="beyond reach"):
        allocate_layer_tau(model, None, ids, 0.95, window=64, progress=False)  # top-1 of 8 experts = 0.875
    with pytest.raises(PrunePathError, match="fewer than one window"):
        allocate_layer_tau(model, None, _ids(100), 0.5, window=128, progress=False)
    with pytest.raises(PrunePathError, match="no calibration data"):
        allocate_layer_tau(model, None, [], 0.5, progress=False)
    with pytest.raises(PrunePathError, match="need a tokenizer"):
        allocate_layer_tau(model, None, texts, 0.5, progress=False)
    with pytest.raises(PrunePathError, match="unknown allocation method"):
        allocate_layer_tau(model, None, ids, 0.5, method="teal", progress=False)
    with pytest.raises(PrunePathError, match="converted"):
        allocate_layer_tau(tiny_llama(), None, ids, 0.5, progress=False)
    with pytest.raises(PrunePathError, match="cumulative"):
        with prunepath.routing(model, rule="topk", k=2):
            allocate_layer_tau(model, None, ids, 0.5, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_eval_fixtures import save_tiny_llama

    root = tmp_path_factory.mktemp("alloccli")
    ckpt = root / "ckpt"
    prunepath.save(tiny_converted(seed=21, router_std=0.2), ckpt, tokenizer=tiny_tokenizer())
    text = root / "text.txt"
    text.write_text(random_text(900, seed=3))
    calib = root / "calib.txt"
    calib.write_text(random_text(900, seed=4))
    short = root / "short.txt"
    short.write_text(random_text(100, seed=1))
    return {"root": root, "ckpt": str(ckpt), "text": str(text), "calib": str(calib), "short": str(short),
            "dense": str(save_tiny_llama(root / "dense", seed=21))}


def test_cli_allocate_and_eval(files, capsys):
    from prunepath.cli.main import main

    out = files["root"] / "alloc"
    rc = main(["allocate", "--model", files["ckpt"], "--target-sparsity", "0.5", "--calib-data", files["calib"],
               "--calib-tokens", "512", "--window", "64", "--out", str(out), "--json",
               str(files["root"] / "a.json"), "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["within_tol"] and printed["method"] == "greedy"
    loaded, _ = prunepath.load(out)
    r = loaded.prunepath.config.routing
    assert r.allocation["target"] == 0.5 and r.allocation["calibration"] == files["calib"]
    assert {str(k): v for k, v in r.layer_tau.items()} == printed["layer_tau"]
    assert "table" in json.loads((files["root"] / "a.json").read_text())
    # eval of the allocated checkpoint uses the stored layer_tau
    res = files["root"] / "e.json"
    assert main(["eval", "--model", str(out), "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--json", str(res), "--no-progress"]) == 0
    e = json.loads(res.read_text())
    assert e["layer_tau"] == printed["layer_tau"] and 0.4 < e["s_ffn"] < 0.6
    # eval --target-sparsity --allocate greedy
    res2 = files["root"] / "g.json"
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--target-sparsity", "0.4", "--allocate", "greedy", "--calib-data", files["calib"],
                 "--calib-tokens", "512", "--json", str(res2), "--no-progress"]) == 0
    g = json.loads(res2.read_text())
    assert g["calibration"]["method"] == "greedy" and abs(g["calibration"]["s_ffn"] - 0.4) <= 0.01
    assert g["routing"]["allocation"]["method"] == "greedy" and abs(g["s_ffn"] - 0.4) < 0.05
    # --tau on an allocated checkpoint replaces the stored allocation
    res3 = files["root"] / "t.json"
    assert main(["eval", "--model", str(out), "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--tau", "1.05", "--json", str(res3), "--no-progress"]) == 0
    assert json.loads(res3.read_text())["s_ffn"] == 0


@pytest.mark.parametrize("argv,message", [
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "1.2", "--out", "{root}/x"], r"\(0, 1\)"),
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "0", "--out", "{root}/x"], r"\(0, 1\)"),
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "0.5", "--calib-data", "{root}/nope.txt",
      "--out", "{root}/x"], "not found"),
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "0.5", "--calib-data", "mix:nope",
      "--out", "{root}/x"], "unknown corpus"),
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "0.5", "--calib-data", "{short}",
      "--calib-tokens", "1000", "--window", "128", "--out", "{root}/x"], "fewer than one window"),
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "0.5", "--calib-tokens", "100", "--window", "128",
      "--out", "{root}/x"], "at least one --window"),
    (["allocate", "--model", "{ckpt}", "--target-sparsity", "0.97", "--calib-data", "{calib}",
      "--calib-tokens", "256", "--window", "64", "--out", "{root}/x"], "beyond reach"),
    (["allocate", "--model", "{dense}", "--target-sparsity", "0.5", "--out", "{root}/x"], "not a PrunePath"),
    (["eval", "--model", "{ckpt}", "--task", "ppl", "--data", "{text}", "--allocate", "greedy"],
     "needs --target-sparsity"),
    (["eval", "--model", "{ckpt}", "--task", "ppl", "--data", "{text}", "--target-sparsity", "0",
      "--allocate", "greedy"], r"\(0, 1\)"),
])
def test_cli_errors_exit_2(files, capsys, argv, message):
    import re

    from prunepath.cli.main import main

    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_sweep_with_greedy_allocation():
    from prunepath.evaluation.sweep import sweep

    model = _model(seed=3)
    ids = _ids(512, seed=8).tolist()
    rows = sweep(model, None, "ppl", ids, target_sparsities=[0.3, 0.6], allocate="greedy", window=64,
                 progress=False)
    assert [r["target_sparsity"] for r in rows] == [0.3, 0.6] and all(r["allocate"] == "greedy" for r in rows)
    assert all(abs(r["calibration"]["s_ffn"] - r["target_sparsity"]) <= 0.01 for r in rows)
    assert all(abs(r["s_ffn"] - r["calibration"]["s_ffn"]) < 1e-9 for r in rows)  # the same tokens
    assert model.prunepath.config.routing.layer_tau == {}
    # a stored allocation does not freeze a τ sweep
    res = allocate_layer_tau(model, None, torch.tensor(ids), 0.5, window=64, progress=False)
    apply_allocation(model, res)
    taus = sweep(model, None, "ppl", ids, [0.5, 1.05], window=64, progress=False)
    assert taus[1]["s_ffn"] == 0 and taus[0]["s_ffn"] > 0
    assert model.prunepath.config.routing.layer_tau == res["layer_tau"]


def test_cli_eval_inner_sparsity(files, capsys):
    """eval --inner-sparsity calibrates in-expert thresholds on --calib-data (required) and reports byte s_FFN."""
    from prunepath.cli.main import main

    res = files["root"] / "inner.json"
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--tau", "1.05", "--inner-sparsity", "0.3", "--calib-data", files["calib"], "--calib-tokens", "512",
                 "--json", str(res), "--no-progress"]) == 0
    r = json.loads(res.read_text())
    assert r["inner"]["target"] == 0.3 and len(r["inner"]["t_in"]) == len(r["inner"]["t_mid"]) == 2
    assert 0.2 < r["s_ffn"] < 0.4 and r["s_experts"] == 0.0
    capsys.readouterr()
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--inner-sparsity", "0.3"]) == 2
    assert "--calib-data" in capsys.readouterr().err
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--inner-sparsity", "1.5", "--calib-data", files["calib"]]) == 2
    assert "(0, 1)" in capsys.readouterr().err
    for extra in (["--inner-allocation", "block"], ["--inner-mid-bias", "0.25"]):
        assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                     "--tau", "1.05", "--inner-sparsity", "0.3", "--calib-data", files["calib"], "--calib-tokens",
                     "512", "--json", str(res), "--no-progress", *extra]) == 0
        r = json.loads(res.read_text())
        assert r["inner"]["f_in"][0] < 0.3 < r["inner"]["f_mid"][0] or extra[0] == "--inner-allocation"
        assert r["inner"]["calibration"]["rule"] == ("block" if extra[0] == "--inner-allocation" else "uniform")
        assert 0.2 < r["s_ffn"] < 0.4
    assert main(["eval", "--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--window", "64",
                 "--inner-sparsity", "0.3", "--calib-data", files["calib"], "--inner-mid-bias", "1.2"]) == 2
    assert "mid bias" in capsys.readouterr().err
