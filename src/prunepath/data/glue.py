"""GLUE-style classification data: SST-2, MRPC, RTE, CoLA in the formats of the shared data folder.

- sst2: ``stsa.binary.*`` ("<label> <sentence>" per line) or GLUE ``train.tsv``/``dev.tsv`` (header ``sentence	label``)
- mrpc: GLUE TSV with header ``Quality	#1 ID	#2 ID	#1 String	#2 String`` (label = Quality, 1 = paraphrase)
- rte:  GLUE TSV with header ``index	sentence1	sentence2	label`` (entailment → 0, not_entailment → 1)
- cola: raw CoLA ``in_domain_*.tsv`` / ``out_of_domain_dev.tsv``, no header: source, label, original label, sentence
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from prunepath.errors import PrunePathError
from prunepath.io import check_text_file, resolve_data_path

TASKS = ("sst2", "mrpc", "rte", "cola")
NUM_LABELS = {"sst2": 2, "mrpc": 2, "rte": 2, "cola": 2}
LABEL_NAMES = {"sst2": ("negative", "positive"), "mrpc": ("not_equivalent", "equivalent"),
               "rte": ("entailment", "not_entailment"), "cola": ("unacceptable", "acceptable")}
EXPECTED = {
    "sst2": "'<label> <sentence>' per line (stsa.binary.*) or a TSV with header columns sentence, label",
    "mrpc": "a TSV with header columns Quality, #1 ID, #2 ID, #1 String, #2 String",
    "rte": "a TSV with header columns index, sentence1, sentence2, label (entailment / not_entailment)",
    "cola": "a headerless TSV with columns source, label, original label, sentence",
}
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


@dataclass
class GlueData:
    """Texts (single sentences have ``None`` as the second element), integer labels and the label count."""

    task: str
    texts: list[tuple[str, str | None]]
    labels: list[int]
    num_labels: int
    path: str | None = None
    label_names: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "GlueData":
        if n is None:
            return self
        return GlueData(self.task, self.texts[:n], self.labels[:n], self.num_labels, self.path, self.label_names)


def infer_task(path: str | os.PathLike) -> str:
    """Task from the path (folder or file name), e.g. .../mrpc/dev.tsv → mrpc, stsa.binary.dev → sst2."""
    text = str(path).lower().replace("-", "").replace("_", "")
    for key, task in (("sst2", "sst2"), ("stsa", "sst2"), ("mrpc", "mrpc"), ("rte", "rte"), ("cola", "cola"),
                      ("indomain", "cola"), ("outofdomain", "cola")):
        if key in text:
            return task
    raise PrunePathError(f"cannot infer the GLUE task from {path}; pass task= one of {', '.join(TASKS)} "
                         "(on the command line: --task sst2|mrpc|rte|cola for eval, --glue-task for train)")


def _read_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:  # utf-8-sig drops MRPC's byte-order mark
        # GLUE TSVs contain unbalanced quotes inside sentences: no quoting at all.
        return [row for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if any(c.strip() for c in row)]


def _int_label(value: str, task: str, path: Path, line: int) -> int:
    try:
        lab = int(value.strip())
    except ValueError as exc:
        raise PrunePathError(f"{path}:{line}: label {value!r} is not an integer; expected {EXPECTED[task]}") from exc
    if not 0 <= lab < NUM_LABELS[task]:
        raise PrunePathError(f"{path}:{line}: label {lab} is outside 0..{NUM_LABELS[task] - 1}")
    return lab


def _columns(header: list[str], names: tuple[str, ...], task: str, path: Path) -> list[int]:
    cols = [h.strip() for h in header]
    missing = [n for n in names if n not in cols]
    if missing:
        raise PrunePathError(f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(cols)}); "
                             f"expected {EXPECTED[task]}")
    return [cols.index(n) for n in names]


def load_glue(path: str | os.PathLike, task: str | None = None) -> GlueData:
    """Read a GLUE-style file; ``task`` is inferred from the path when None. Bad files raise PrunePathError
    naming the expected columns."""

    p = resolve_data_path(path)
    check_text_file(p)
    task = task or infer_task(p)
    if task not in TASKS:
        raise PrunePathError(f"unknown GLUE task {task!r}; choose one of {', '.join(TASKS)}")
    if p.stat().st_size == 0:
        raise PrunePathError(f"{p} is empty; expected {EXPECTED[task]}")
    texts: list[tuple[str, str | None]] = []
    labels: list[int] = []
    if task == "sst2" and "\t" not in p.read_text(encoding="utf-8-sig")[:4096]:
        # stsa.binary.*: "<label> <sentence>"
        for i, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(" ", 1)
            if len(parts) < 2 or not parts[1].strip():
                raise PrunePathError(f"{p}:{i}: expected {EXPECTED[task]}")
            labels.append(_int_label(parts[0], task, p, i))
            texts.append((parts[1].strip(), None))
    else:
        rows = _read_rows(p)
        if not rows:
            raise PrunePathError(f"{p} has no rows; expected {EXPECTED[task]}")
        if task == "cola":
            for i, row in enumerate(rows, 1):
                if len(row) < 4:
                    raise PrunePathError(f"{p}:{i}: {len(row)} column(s); expected {EXPECTED[task]}")
                labels.append(_int_label(row[1], task, p, i))
                texts.append((row[3].strip(), None))
        else:
            names = {"sst2": ("sentence", "label"), "mrpc": ("Quality", "#1 String", "#2 String"),
                     "rte": ("sentence1", "sentence2", "label")}[task]
            idx = _columns(rows[0], names, task, p)
            for i, row in enumerate(rows[1:], 2):
                if len(row) <= max(idx):
                    raise PrunePathError(f"{p}:{i}: {len(row)} column(s); expected {EXPECTED[task]}")
                vals = [row[j] for j in idx]
                if task == "sst2":
                    texts.append((vals[0].strip(), None))
                    labels.append(_int_label(vals[1], task, p, i))
                elif task == "mrpc":
                    labels.append(_int_label(vals[0], task, p, i))
                    texts.append((vals[1].strip(), vals[2].strip()))
                else:
                    lab = vals[2].strip()
                    if lab not in RTE_LABELS:
                        raise PrunePathError(f"{p}:{i}: label {lab!r}; expected entailment or not_entailment")
                    labels.append(RTE_LABELS[lab])
                    texts.append((vals[0].strip(), vals[1].strip()))
    if not labels:
        raise PrunePathError(f"{p} has a header but no examples; expected {EXPECTED[task]}")
    return GlueData(task, texts, labels, NUM_LABELS[task], str(p), LABEL_NAMES[task])
