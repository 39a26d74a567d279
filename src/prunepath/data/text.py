"""Raw text sources → lists of documents (strings), split by document into train / validation.

A source is one of:
- a named offline corpus (``sotu``, ``moby-dick``, ``brown``, ``austen``, ``kjv``) or a ``mix`` of them
  (:mod:`prunepath.data.corpora`);
- a directory: every ``*.txt`` file under it is one document;
- a text file: documents are WikiText-style articles (`` = Title = `` headings) when present, else paragraphs
  separated by blank lines;
- a ``.json`` / ``.jsonl`` file: a list of strings or of records with a text field (``text`` by default);
- ``hf:NAME[:CONFIG]``: a Hugging Face ``datasets`` name (needs the Hub; a clear error when unreachable).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prunepath.data.corpora import is_corpus_name, load_corpus, split_documents
from prunepath.errors import PrunePathError
from prunepath.io import check_text_file

_WIKI_HEADING = re.compile(r"^ = [^=].* = $", re.M)


def split_text_file(text: str) -> list[str]:
    """One text file → documents: WikiText articles when its headings are there, else blank-line paragraphs."""
    starts = [m.start() for m in _WIKI_HEADING.finditer(text)]
    if len(starts) >= 2:
        bounds = starts + [len(text)]
        head = text[:starts[0]].strip()
        docs = [text[a:b].strip() for a, b in zip(bounds, bounds[1:])]
        return ([head] if head else []) + [d for d in docs if d]
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _records_from_json(path: Path) -> list:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PrunePathError(f"{path}:{n} is not valid JSON ({exc.msg}); a .jsonl file needs one JSON "
                                     "object per line") from exc
        return out
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PrunePathError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); use a JSON list, "
                             "JSON Lines (.jsonl) or plain text (.txt)") from exc
    if isinstance(data, dict):
        for key in ("data", "train", "examples", "rows"):
            if isinstance(data.get(key), list):
                return data[key]
        raise PrunePathError(f"{path} holds a JSON object; expected a list of records (or {{'data': [...]}})")
    if not isinstance(data, list):
        raise PrunePathError(f"{path} must hold a JSON list of strings or records")
    return data


def texts_from_records(records: list, text_field: str | None, where: str) -> list[str]:
    """Strings from JSON records: the records themselves, or their ``text_field`` (default ``text``)."""
    out = []
    field = text_field or "text"
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, dict):
            if field not in rec:
                raise PrunePathError(f"{where}: record {i} has no {field!r} field (it has {sorted(rec)[:8]}); pass "
                                     "--text-field NAME, or use --task instruct for prompt/response data")
            if rec[field] is not None:
                out.append(str(rec[field]))
        else:
            raise PrunePathError(f"{where}: record {i} is a {type(rec).__name__}; expected a string or an object")
    return [t for t in out if t.strip()]


def _load_hf(spec: str, split: str, text_field: str | None) -> list[str]:
    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 else None)
    try:
        import datasets
    except ImportError as exc:
        raise PrunePathError("hf: sources need the `datasets` package (pip install datasets)") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any Hub/network failure becomes one clear message
        raise PrunePathError(f"could not load Hugging Face dataset {name!r} ({config}) split {split!r}: "
                             f"{str(exc).splitlines()[0][:200]}. Without the Hub, use a named corpus "
                             "(sotu, brown, austen, kjv, moby-dick, mix) or a local file") from exc
    field = text_field or "text"
    if field not in ds.column_names:
        raise PrunePathError(f"dataset {name!r} has no column {field!r} (columns: {ds.column_names}); "
                             "pass --text-field")
    return [t for t in ds[field] if t and t.strip()]


def load_documents(source: str | Path, *, text_field: str | None = None) -> list[dict]:
    """All documents of a source as ``{"id", "text"}`` (before any split)."""
    s = str(source)
    if is_corpus_name(s):
        return load_corpus(s)
    path = Path(s).expanduser()
    if not path.exists():
        raise PrunePathError(f"no such data file or directory: {path}. Named corpora: sotu, moby-dick, brown, "
                             "austen, kjv, mix; Hugging Face datasets: hf:NAME[:CONFIG]")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise PrunePathError(f"{path} has no .txt files; put one document per .txt file there")
        return [{"id": str(p.relative_to(path)), "text": p.read_text(encoding="utf-8", errors="replace")}
                for p in files]
    if path.suffix in (".json", ".jsonl"):
        texts = texts_from_records(_records_from_json(path), text_field, str(path))
    elif path.suffix in (".tsv", ".csv"):
        raise PrunePathError(f"{path} is a {path.suffix} table; for classification use --task classify, for "
                             "language modelling pass a text file, a directory of .txt files or a JSON(L) file")
    else:
        check_text_file(path)
        raw = path.read_bytes()
        texts = split_text_file(raw.decode("utf-8", errors="replace"))
    if not texts:
        raise PrunePathError(f"{path} contains no text")
    return [{"id": f"{path.name}#{i}", "text": t} for i, t in enumerate(texts)]


def load_texts(source: str | Path, split: str = "train", *, valid_fraction: float = 0.05, seed: int = 0,
               text_field: str | None = None) -> list[str]:
    """Documents (strings) of ``split`` ("train", "validation" or "all") of a source, split by document."""
    s = str(source)
    if s.startswith("hf:"):
        return _load_hf(s, "train" if split == "all" else split, text_field)
    docs = load_documents(s, text_field=text_field)
    return [d["text"] for d in split_documents(docs, split, valid_fraction, seed)]
