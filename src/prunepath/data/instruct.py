"""Instruction and summarisation examples as (prompt, response) pairs.

- Alpaca-style JSON (a list of {instruction, input, output}) with the standard Stanford Alpaca prompt template.
- XSum-style JSONL ({document, summary[, id]} per line) with a short "Summarize ..." prompt; the raw document
  and summary are kept (``document`` / ``summary`` keys) so callers can truncate the document to a token budget.
A JSON list / JSONL of {prompt, response} is accepted as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.io import check_text_file, resolve_data_path

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
XSUM_PROMPT = "Summarize the following article in one sentence.\n\nArticle: {document}\n\nSummary:"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def xsum_prompt(document: str) -> str:
    return XSUM_PROMPT.format(document=document.strip())


def _convert(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise PrunePathError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec and "response" in rec:
        return {"prompt": str(rec["prompt"]), "response": str(rec["response"])}
    if "instruction" in rec and "output" in rec:
        return {"prompt": alpaca_prompt(str(rec["instruction"]), str(rec.get("input") or "")),
                "response": str(rec["output"])}
    if "document" in rec and "summary" in rec:
        return {"prompt": xsum_prompt(str(rec["document"])), "response": " " + str(rec["summary"]).strip(),
                "document": str(rec["document"]), "summary": str(rec["summary"]).strip()}
    raise PrunePathError(f"{where}: keys {sorted(rec)} are not an example; expected instruction/input/output "
                         "(Alpaca), document/summary (XSum) or prompt/response")


def load_examples(path: str | os.PathLike) -> list[dict]:
    """(prompt, response) dicts from Alpaca-style JSON or XSum-style JSONL (format detected from the content)."""

    p: Path = resolve_data_path(path)
    check_text_file(p)
    text = p.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise PrunePathError(f"{p} is empty; expected Alpaca JSON (instruction, input, output) or XSum JSONL "
                             "(document, summary)")
    stripped = text.lstrip()
    records: list[tuple[object, str]]
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrunePathError(f"{p} is not valid JSON ({exc})") from exc
        records = [(r, f"{p}[{i}]") for i, r in enumerate(data)]
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{p}:{i}"))
            except json.JSONDecodeError as exc:
                raise PrunePathError(f"{p}:{i} is not a JSON line ({exc}); expected JSONL with document/summary "
                                     "or a JSON list") from exc
    out = [_convert(r, where) for r, where in records]
    if not out:
        raise PrunePathError(f"{p} holds no examples")
    return out
