"""Named corpora: parsers on synthetic inputs, deterministic document splits, the cache (no network)."""

import json
import struct
import zlib

import pytest

from prunepath.data import corpora
from prunepath.data.corpora import (austen_documents, clean_brown, corpus_names, load_corpus, parse_kjv,
                                    read_rdb_character_vectors, split_chapters, split_documents)
from prunepath.errors import PrunePathError


def _xdr_strings(strings, version=3):
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            b = s.encode()
            out += struct.pack(">ii", 9 | (1 << 15) << 0, len(b)) + b  # gp bits (UTF-8 flag) are ignored
    return out


def _xdr_ints(values):
    return (b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + struct.pack(">ii", 13, len(values))
            + struct.pack(f">{len(values)}i", *values))


def _blob(raw):
    return struct.pack(">i", len(raw)) + zlib.compress(raw)


def test_rdb_reader_on_synthetic_blobs():
    a = ["EMMA", "", "CHAPTER I", "Emma Woodhouse, handsome,", "clever, and rich.", "", "CHAPTER II", "Next."]
    b = ["PERSUASION", "Chapter 1", "Sir Walter Elliot, of Kellynch Hall,", None, "Chapter 2", "More."]
    data = _blob(_xdr_strings(a)) + _blob(_xdr_ints([1, 2, 3])) + _blob(_xdr_strings(b, version=2))
    vecs = read_rdb_character_vectors(data)
    assert vecs == [a, [s or "" for s in b]]
    docs = austen_documents(data)
    assert [d["id"] for d in docs] == ["emma/ch001", "emma/ch002", "persuasion/ch001", "persuasion/ch002"]
    assert docs[0]["text"] == "Emma Woodhouse, handsome, clever, and rich."
    with pytest.raises(PrunePathError, match="corrupt"):
        read_rdb_character_vectors(data[:40])


def test_split_chapters_drops_front_matter_and_joins_paragraphs():
    lines = ["TITLE", "by someone", "CHAPTER 1", "a b", "c", "", "d", "Chapter II", "e"]
    docs = split_chapters(lines, "bk")
    assert docs == [{"id": "bk/ch001", "text": "a b c\n\nd"}, {"id": "bk/ch002", "text": "e"}]


def test_clean_brown_strips_tags():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, then/rb left/vbd ./.\n\n\n\tIt/pps ended/vbd ./.\n"
    assert clean_brown(tagged) == 'The jury said " no ", then left.\n\nIt ended.'


def test_parse_kjv_output():
    text = ("\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n  2 And the earth was "
            "without form, and void; and darkness was upon the face of\nthe deep.\n\n1 Kings 2\n\n  1 Now the "
            "days of David drew nigh.\n")
    docs = parse_kjv(text)
    assert [d["id"] for d in docs] == ["Genesis 1", "1 Kings 2"]
    assert docs[0]["text"].endswith("upon the face of the deep.")
    assert "1 In" not in docs[0]["text"] and "  " not in docs[0]["text"]


def test_split_documents_is_deterministic_disjoint_and_stable():
    docs = [{"id": f"d{i}", "text": str(i)} for i in range(400)]
    tr, va = split_documents(docs, "train", 0.1), split_documents(docs, "validation", 0.1)
    assert {d["id"] for d in tr}.isdisjoint({d["id"] for d in va})
    assert len(tr) + len(va) == 400 and 15 < len(va) < 70
    assert split_documents(docs, "validation", 0.1) == va
    # Adding documents never moves an existing one between splits.
    more = docs + [{"id": f"new{i}", "text": ""} for i in range(50)]
    assert {d["id"] for d in va} <= {d["id"] for d in split_documents(more, "validation", 0.1)}
    assert split_documents(docs, "validation", 0.1, seed=1) != va
    # A tiny corpus still gets one validation document.
    assert len(split_documents(docs[:3], "validation", 0.01)) == 1
    with pytest.raises(PrunePathError):
        split_documents(docs, "test")


def test_corpus_names_and_errors():
    assert corpus_names("mix:sotu,brown") == ["sotu", "brown"]
    assert corpus_names("mix") == list(corpora.CORPORA)
    with pytest.raises(PrunePathError, match="unknown corpus"):
        corpus_names("mix:sotu,shakespeare")


def test_load_corpus_caches_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path))
    calls = []

    def fake(work):
        calls.append(work)
        return [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}]

    def broken(work):
        raise PrunePathError("registry unreachable")

    monkeypatch.setitem(corpora.FETCHERS, "sotu", fake)
    monkeypatch.setitem(corpora.FETCHERS, "brown", broken)
    assert load_corpus("sotu") == [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}]
    assert load_corpus("sotu") and len(calls) == 1  # second call reads the cache
    with pytest.raises(PrunePathError, match="unreachable"):
        load_corpus("mix:sotu,brown")
    assert sorted(p.name for p in (tmp_path / "corpora").iterdir()) == ["sotu.jsonl"]  # no partial file
    lines = (tmp_path / "corpora" / "sotu.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"id": "a", "text": "alpha"}
    (tmp_path / "corpora" / "sotu.jsonl").write_text("{not json\n")
    with pytest.raises(PrunePathError, match="corrupt"):
        load_corpus("sotu")


def test_mix_prefixes_document_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path))
    monkeypatch.setitem(corpora.FETCHERS, "sotu", lambda w: [{"id": "x", "text": "s"}])
    monkeypatch.setitem(corpora.FETCHERS, "kjv", lambda w: [{"id": "x", "text": "k"}])
    assert [d["id"] for d in load_corpus("mix:sotu,kjv")] == ["sotu/x", "kjv/x"]
