"""`prunepath baseline` builds checkpoints that `prunepath eval` measures like any other."""

import json

import pytest

import prunepath
from prunepath.cli.main import main
from test_eval_fixtures import one_thread, random_text, save_tiny_llama  # noqa: F401


@pytest.fixture
def env(tmp_path, one_thread):  # noqa: F811
    model_dir = save_tiny_llama(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(random_text(200, seed=s) for s in range(10, 20)))
    data = tmp_path / "valid.txt"
    data.write_text(random_text(400, seed=1))
    return tmp_path, model_dir, calib, data


def evaluate(path, data, out):
    assert main(["eval", "--model", str(path), "--task", "ppl", "--data", str(data), "--window", "64",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method,extra,expected_s", [
    ("static", ["--sparsity", "0.5"], 0.5),
    ("moefication", ["--k", "2", "--fit-steps", "5"], 1 - 2 / 8),
    ("wanda", ["--sparsity", "0.4"], 0.4),
])
def test_baseline_checkpoints_evaluate_with_their_sparsity(env, method, extra, expected_s, capsys):
    tmp, model_dir, calib, data = env
    out = tmp / method
    assert main(["baseline", "--method", method, "--model", str(model_dir), "--out", str(out), "--calib-data",
                 str(calib), "--neurons-per-expert", "8", "--calib-tokens", "512", "--no-progress", *extra]) == 0
    assert "saved" in capsys.readouterr().out
    res = evaluate(out, data, tmp / f"{method}.json")
    assert res["s_ffn"] == pytest.approx(expected_s, abs=0.02)


def test_d2dmoe_checkpoint(env):
    tmp, model_dir, calib, data = env
    assert main(["baseline", "--method", "d2dmoe", "--model", str(model_dir), "--out", str(tmp / "d"),
                 "--calib-data", str(calib), "--neurons-per-expert", "8", "--calib-tokens", "512", "--fit-steps",
                 "5", "--tau", "0.3", "--no-progress"]) == 0
    res = evaluate(tmp / "d", data, tmp / "d.json")
    assert 0 < res["s_ffn"] < 1


def test_baseline_errors(env, capsys):
    tmp, model_dir, calib, _ = env
    assert main(["baseline", "--method", "static", "--model", str(model_dir), "--out", str(tmp / "s"),
                 "--calib-data", str(calib)]) == 2
    assert "needs --sparsity" in capsys.readouterr().err
    assert main(["baseline", "--method", "wanda", "--model", str(model_dir), "--out", str(tmp / "w"),
                 "--calib-data", str(calib), "--sparsity", "1.5"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp / "w").exists() and not (tmp / "s").exists()


def test_d2dmoe_threshold_has_its_own_flag_and_tau_is_a_deprecated_alias(env, capsys):
    tmp, model_dir, calib, _ = env
    common = ["baseline", "--method", "d2dmoe", "--model", str(model_dir), "--calib-data", str(calib),
              "--neurons-per-expert", "8", "--calib-tokens", "512", "--fit-steps", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp / "t"), "--threshold", "0.3"]) == 0
    cap = capsys.readouterr()
    assert "τ 0.3" in cap.out and "deprecated" not in cap.err
    assert prunepath.load(tmp / "t")[0].prunepath.config.routing.tau == 0.3
    assert main([*common, "--out", str(tmp / "a"), "--tau", "0.3"]) == 0
    assert "deprecated" in capsys.readouterr().err
    assert prunepath.load(tmp / "a")[0].prunepath.config.routing.tau == 0.3
    assert main([*common, "--out", str(tmp / "b"), "--tau", "0.3", "--threshold", "0.4"]) == 2
    assert "disagree" in capsys.readouterr().err and not (tmp / "b").exists()
    assert main([*common, "--out", str(tmp / "c"), "--threshold", "0"]) == 2
    assert "--threshold must be > 0" in capsys.readouterr().err


def test_tau_help_is_one_text_for_eval_generate_convert(capsys):
    from prunepath.cli.common import TAU_HELP

    for cmd in ("eval", "generate", "convert"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert " ".join(TAU_HELP.split()) in " ".join(capsys.readouterr().out.split())
