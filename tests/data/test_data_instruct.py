"""Instruction / summarisation readers: Alpaca JSON, XSum JSONL, prompt/response, errors."""

from __future__ import annotations

import json

import pytest

from prunepath.data.instruct import ALPACA_NO_INPUT, load_examples
from prunepath.errors import PrunePathError


def test_alpaca_and_xsum(tmp_path):
    a = tmp_path / "alpaca.json"
    a.write_text(json.dumps([{"instruction": "Add.", "input": "1+1", "output": "2"},
                             {"instruction": "Greet.", "input": "", "output": "Hi"}]))
    ex = load_examples(a)
    assert "### Input:\n1+1" in ex[0]["prompt"] and ex[0]["prompt"].endswith("### Response:\n")
    assert ex[1]["prompt"] == ALPACA_NO_INPUT.format(instruction="Greet.") and ex[1]["response"] == "Hi"
    x = tmp_path / "xsum.jsonl"
    x.write_text(json.dumps({"document": "Long text.\nMore.", "summary": "Short.", "id": "1"}) + "\n\n")
    ex = load_examples(x)
    assert ex[0]["prompt"].startswith("Summarize") and "Long text.\nMore." in ex[0]["prompt"]
    assert ex[0]["response"] == " Short." and ex[0]["document"] == "Long text.\nMore."


def test_errors(tmp_path):
    e = tmp_path / "e.jsonl"
    e.write_text("  \n")
    with pytest.raises(PrunePathError, match="empty"):
        load_examples(e)
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": "no summary"}\n')
    with pytest.raises(PrunePathError, match="document/summary"):
        load_examples(b)
    c = tmp_path / "c.jsonl"
    c.write_text('{"document": "x", "summary": "y"}\n{broken\n')
    with pytest.raises(PrunePathError, match=":2 is not a JSON line"):
        load_examples(c)
