"""Issue 15: what a user who clones only the repository meets. The main job's data ships with the package, bad
input fails at once (before any model loads) with a message naming the fix, a resumed run keeps its original
time, and every command's --out is a directory. No real model is loaded here."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml

import prunepath
from prunepath import PrunePathError
from prunepath.cli.main import build_parser, main
from prunepath import io as common  # data paths and text checks live in prunepath.io (were in evaluation.common)
from test_eval_fixtures import one_thread, random_text, save_tiny_llama  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
WIKI_SHA256 = "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: argument errors must come first."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    import prunepath.models.loading as loading

    monkeypatch.setattr(prunepath, "load_model", boom)
    monkeypatch.setattr(loading, "load_model", boom)
    return boom


@pytest.fixture
def bare_clone(monkeypatch, tmp_path):
    """As in a clone without ../shared: $PRUNEPATH_DATA is an empty folder, the shared folder does not exist."""
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("PRUNEPATH_DATA", str(empty))
    monkeypatch.setattr(common, "repo_shared_data_dir", lambda: tmp_path / "no-shared" / "data")
    return empty


# ---- 1. the main job's data ships with the package -------------------------------------------------------------

def test_wikitext_valid_resolves_from_the_package_without_shared(bare_clone):
    p = common.resolve_data_path("wikitext-2/wiki.valid.raw")
    assert p == common.builtin_data_dir() / "wikitext-2" / "wiki.valid.raw"
    assert REPO / "src" in p.parents  # inside the repository (an editable install reads it in place)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == WIKI_SHA256
    assert bare_clone not in p.parents and "shared" not in p.parts
    attribution = (p.parent / "README.md").read_text()
    assert "CC BY-SA 3.0" in attribution and "Merity" in attribution and WIKI_SHA256 in attribution


def test_prunepath_data_still_searched_first(bare_clone):
    (bare_clone / "wikitext-2").mkdir()
    (bare_clone / "wikitext-2" / "wiki.valid.raw").write_text(" = A = \n text\n")
    assert common.resolve_data_path("wikitext-2/wiki.valid.raw") == bare_clone / "wikitext-2" / "wiki.valid.raw"


def test_missing_data_error_says_where_and_how(bare_clone):
    with pytest.raises(PrunePathError) as exc:
        common.resolve_data_path("sst2/glue/dev.tsv")
    msg = str(exc.value)
    assert str(bare_clone) in msg and str(common.builtin_data_dir()) in msg  # where it looked
    assert "PRUNEPATH_DATA" in msg and "docs/evaluation.md" in msg and "ships with PrunePath" in msg  # how to fix


def test_package_data_is_declared_for_regular_installs():
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["prunepath.data"]
    base = REPO / "src" / "prunepath" / "data"
    shipped = {p for g in globs for p in base.glob(g)}
    assert base / "builtin" / "wikitext-2" / "wiki.valid.raw" in shipped
    assert base / "builtin" / "wikitext-2" / "README.md" in shipped


def test_readme_and_docs_link_only_inside_the_repository():
    """Every relative link of README.md and docs/*.md resolves to a file of the repository (no ../shared)."""
    bad = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if REPO not in path.parents or not path.exists():
                bad.append(f"{md.relative_to(REPO)}: {target}")
    assert not bad, bad
    method = (REPO / "docs" / "method.md").read_text()
    for topic in ("router", "τ", "s_FFN", "entropy", "balance", "Stage 1", "Stage 2", "departures"):
        assert topic in method, topic
    assert "docs/method.md" in (REPO / "README.md").read_text()


def test_setup_and_packaging_do_not_need_shared():
    for f in ("scripts/setup.sh", "pyproject.toml", ".ci/run"):
        assert "shared" not in (REPO / f).read_text(), f


# ---- 2. a misspelled built-in name: "did you mean", at once, no Hub -------------------------------------------

def test_misspelled_builtin_fails_at_once_without_hub(monkeypatch):
    import transformers

    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for name, want in (("smollm2-135", "smollm2-135m"), ("SmolLM2-135M", "smollm2-135m"),
                       ("gemma3-270", "gemma3-270m"), ("smollm2", "smollm2-135m")):
        t = time.perf_counter()
        with pytest.raises(PrunePathError, match=f"did you mean {re.escape(want)}"):
            prunepath.load_model(name)
        assert time.perf_counter() - t < 2


def test_misspelled_builtin_cli(no_model_load, capsys):
    assert main(["eval", "--model", "smollm2-135", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw"]) == 2
    assert "did you mean smollm2-135m" in capsys.readouterr().err


def test_unreachable_hub_switches_to_offline_mode(monkeypatch):
    import huggingface_hub.constants as hub_constants

    import prunepath.models.loading as loading

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(loading, "_HUB_REACHABLE", None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    t = time.perf_counter()
    with pytest.raises(PrunePathError, match="unreachable"):
        prunepath.load_model("nobody-here/no-such-model")
    assert time.perf_counter() - t < 10
    assert hub_constants.HF_HUB_OFFLINE is True


def test_hub_ids_and_unrelated_names_are_not_taken_for_typos():
    from prunepath.models.registry import near_builtin

    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M", "bert-base-uncased", "./smollm2-135", "smollm2-135m"):
        assert near_builtin(name) is None, name


# ---- 3. binary data is not text ----------------------------------------------------------------------------------

@pytest.fixture
def elf(tmp_path):
    p = tmp_path / "prog"
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 64)
    return p


def test_binary_data_rejected_before_model_load(elf, no_model_load, capsys):
    assert main(["eval", "--model", "smollm2-135m", "--task", "ppl", "--data", str(elf)]) == 2
    assert "looks binary" in capsys.readouterr().err


def test_text_check_in_the_reader(elf, tmp_path):
    from prunepath.evaluation.perplexity import tokenize_text

    with pytest.raises(PrunePathError, match="looks binary"):
        tokenize_text(lambda s, **k: {"input_ids": [1] * len(s)}, elf)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 100)
    with pytest.raises(PrunePathError, match="not UTF-8"):
        common.check_text_file(latin1)
    controls = tmp_path / "controls.txt"
    controls.write_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 65]) * 200)
    with pytest.raises(PrunePathError, match="control characters"):
        common.check_text_file(controls)
    ok = tmp_path / "ok.txt"  # a multi-byte character cut by the sample's end is still text
    ok.write_text("a" * 9 + "é" * 100)
    common.check_text_file(ok, sample_bytes=10)


# ---- 4. every argument checked before the model loads; recipe typos get the closest names -----------------------

@pytest.mark.parametrize("argv,message", [
    (["eval", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--tau", "0"], "--tau must be > 0"),
    (["eval", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--tau", "-1"], "--tau must be > 0"),
    (["eval", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--window", "0"], "--window must be >= 1"),
    (["eval", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--stride", "600"], "--stride"),
    (["eval", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--max-tokens", "1"], "--max-tokens"),
    (["eval", "--task", "ppl", "--data", "nope/missing.txt"], "data file not found"),
    (["eval", "--task", "recon", "--data", "wikitext-2/wiki.valid.raw", "--ks", "0,2"], "--ks"),
    (["eval", "--task", "lm-eval"], "--lm-eval-tasks"),
    (["eval", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--target-sparsity", "0.5",
      "--calib-data", "nope.txt"], "not found"),
    (["sweep", "--model", "x", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--taus", "0.5",
      "--batch-size", "0", "--out", "{tmp}/s"], "--batch-size"),
    (["sweep", "--model", "x", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--taus", "0.5",
      "--dense", "smollm2-13", "--out", "{tmp}/s"], "did you mean smollm2-135m"),
    (["generate", "--prompt", "hi", "--tau", "0"], "--tau must be > 0"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["convert", "--out", "{tmp}/c", "--tau", "-1"], "--tau must be > 0"),
    (["convert", "--out", "{tmp}/c", "--num-experts", "0"], "--num-experts must be >= 1"),
    (["convert", "--out", "{tmp}/afile"], "existing file"),
    (["convert", "--out", "{tmp}/full"], "not a PrunePath checkpoint"),
    (["train", "--out", "{tmp}/t", "--data", "sotu", "--ppl-taus", "0,0.5"], "every τ"),
    (["train", "--out", "{tmp}/t", "--data", "sotu", "--ppl-data", "nope.txt"], "not found"),
    (["train", "--out", "{tmp}/t", "--data", "{tmp}/missing.txt"], "no such data file"),
    (["train", "--out", "{tmp}/t", "--data", "sotu", "--model", "gemma3-27m"], "did you mean gemma3-270m"),
    (["baseline", "--method", "wanda", "--sparsity", "1.5", "--out", "{tmp}/b"], "--sparsity"),
    (["baseline", "--method", "moefication", "--fit-steps", "0", "--out", "{tmp}/b"], "--fit-steps"),
    (["baseline", "--method", "moefication", "--calib-data", "{tmp}/missing.txt", "--out", "{tmp}/b"],
     "no such data file"),
    (["run", "recipes/quickstart.yaml", "--model", "smollm2-135"], "did you mean smollm2-135m"),
    (["run", "recipes/quickstart.yaml", "--deadline-s", "0"], "--deadline-s"),
])
def test_bad_arguments_fail_before_the_model_loads(argv, message, tmp_path, no_model_load, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    t = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert time.perf_counter() - t < 10


def test_recipe_typos_get_the_closest_names(tmp_path, no_model_load, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "x", "evalution": {"task": "ppl"}}))
    assert main(["run", str(r)]) == 2
    err = capsys.readouterr().err
    assert "did you mean evaluation?" in err
    r.write_text(yaml.safe_dump({"name": "x", "train": {"task": "lm", "stage1_step": 3}}))
    assert main(["run", str(r)]) == 2
    err = capsys.readouterr().err
    assert "'stage1_step' (did you mean stage1_steps" in err
    assert "router_distill" not in err  # not the list of every setting
    r.write_text(yaml.safe_dump({"name": "x", "evaluation": {"task": "ppl", "max_token": 9}}))
    assert main(["run", str(r)]) == 2
    assert "did you mean max_tokens?" in capsys.readouterr().err


# ---- 5. a re-run keeps the original run's time -------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_rerun_keeps_the_original_time_and_adds_the_resume(tmp_path):
    from prunepath.pipeline import load_run_recipe, run_recipe

    model_dir = save_tiny_llama(tmp_path / "tiny")
    data = tmp_path / "valid.txt"
    data.write_text(random_text(300, seed=1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(name="t", model=str(model_dir), out=str(tmp_path / "out"),
                                          convert={"neurons_per_expert": 8},
                                          evaluation={"task": "ppl", "data": str(data), "window": 64},
                                          sweep={"taus": [1.05, 0.5]})))
    out = tmp_path / "out"
    run_recipe(load_run_recipe(recipe), progress=False)
    timing = json.loads((out / "timing.json").read_text())
    assert len(timing["sessions"]) == 1
    timing["sessions"][0]["seconds"] = 612.0  # as if the first run had taken 10.2 min
    (out / "timing.json").write_text(json.dumps(timing))
    run_recipe(load_run_recipe(recipe), progress=False)
    line = next(x for x in (out / "summary.md").read_text().splitlines() if x.startswith("time:"))
    assert line.startswith("time: 10.2 min (first run) + ") and "in 1 resumed run = 10.2 min" in line, line
    # A run finished before timing.json existed: its summary's time is kept as the first run's.
    (out / "timing.json").unlink()
    text = (out / "summary.md").read_text()
    (out / "summary.md").write_text(re.sub(r"^time: .*$", "time: 27.0 min", text, flags=re.M))
    run_recipe(load_run_recipe(recipe), progress=False)
    assert "time: 27.0 min (first run) + " in (out / "summary.md").read_text()


# ---- 7. --out is a directory for sweep as for run ----------------------------------------------------------------

def test_sweep_old_prefix_form_gets_a_message(tmp_path, no_model_load, capsys):
    argv = ["sweep", "--model", "x", "--task", "ppl", "--data", "wikitext-2/wiki.valid.raw", "--taus", "0.5",
            "--out", str(tmp_path / "sw.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out is a directory now" in err and f"--out {tmp_path / 'sw'}" in err
    help_text = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "DIR/results.{json,csv,md}" in help_text and "frontier.png" in help_text


# ---- 8. convert --no-progress; the thread tip sits by the main command --------------------------------------------

def test_convert_accepts_no_progress():
    args = build_parser().parse_args(["convert", "--out", "x", "--no-progress"])
    assert args.progress is False
    assert build_parser().parse_args(["convert", "--out", "x"]).progress is True


def test_readme_thread_tip_is_next_to_the_main_command():
    lines = (REPO / "README.md").read_text().splitlines()
    main_cmd = next(i for i, x in enumerate(lines) if "prunepath run recipes/quickstart.yaml" in x)
    tip = next(i for i, x in enumerate(lines) if "OMP_NUM_THREADS=1" in x)
    assert abs(tip - main_cmd) <= 6
