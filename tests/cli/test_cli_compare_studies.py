"""The sub-commands that were argparse front ends inside ``prunepath.pipeline`` (compare, compare_trained,
compare_report, study_report, nlu_study): listed in ``prunepath --help``, a bad input fails with a clear message
and exit status 2, and the old ``python -m prunepath.pipeline.X`` entry points say where the command went."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prunepath.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src" / "prunepath"
MOVED = {"compare": "compare", "compare_trained": "compare-trained", "compare_report": "compare-report",
         "study_report": "study-report", "nlu_study": "nlu-study"}


def test_listed_in_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in MOVED.values():
        assert f"    {command} " in out or f"    {command}\n" in out, command


@pytest.mark.parametrize("argv,message", [
    (["compare", "--model", "no-such-model-xyz", "--out", "OUT/r.json"], "not a built-in name"),
    (["compare", "--targets", "0.3,x", "--out", "OUT/r.json"], "--targets must be a comma-separated list of numbers"),
    (["compare-trained", "--calib-file", "c.json", "--eval-data", "e.txt", "--out", "OUT/r.json"],
     "the following arguments are required: --train-file"),
    (["compare-trained", "--model", "no-such-model-xyz", "--train-file", "t.json", "--calib-file", "c.json",
      "--eval-data", "e.txt", "--out", "OUT/r.json", "--device", "cpu"], "not a built-in name"),
    (["compare-report"], "the following arguments are required: routers"),
    (["study-report", "--tag", "x"], "the following arguments are required: results"),
    (["nlu-study"], "give a recipe (or --report RECORDS)"),
])
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own checks
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert f"prunepath {argv[0]}: error: " in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_compare_report_prints_tables_and_plot(tmp_path, capsys):
    rows = [{"key": "dense", "method": "dense", "s_ffn": 0.0, "ppl": 10.0},
            {"key": "prunepath@0.5", "method": "prunepath", "s_ffn": 0.49, "ppl": 12.0},
            {"key": "wanda@0.5", "method": "wanda", "s_ffn": 0.5, "ppl": 15.0}]
    routers = tmp_path / "routers.json"
    routers.write_text(json.dumps({"meta": {}, "rows": rows}))
    trained = tmp_path / "trained.json"
    trained.write_text(json.dumps({"meta": {"training": {"tokens": 1000}},
                                   "rows": [{"key": "prunepath@0.3", "method": "prunepath", "s_ffn": 0.3, "ppl": 11.0}]}))
    png = tmp_path / "p.png"
    assert main(["compare-report", str(routers), str(trained), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Frozen backbone\n\n| method |") and "\n### Trained\n\n" in out
    assert "| prunepath | " in out and "12 (0.49)" in out
    assert out.rstrip().endswith(f"plot: {png}") and png.exists()


def test_no_argument_parsing_below_cli():
    """Only ``prunepath.cli`` parses arguments; nothing below it imports argparse."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                offenders.append(str(path.relative_to(SRC)))
    assert offenders == []


@pytest.mark.parametrize("module", sorted(MOVED))
def test_old_module_entry_points_say_where_the_command_went(module):
    proc = subprocess.run([sys.executable, "-m", f"prunepath.pipeline.{module}", "--help"], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(SRC.parent)})
    assert proc.returncode == 1
    assert f"moved: run `prunepath {MOVED[module]}`" in proc.stderr
