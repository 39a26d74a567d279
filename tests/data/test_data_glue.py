"""GLUE-style readers: every shared-data format, task inference, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunepath.data.glue import load_glue
from prunepath.errors import PrunePathError


def test_formats(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "stsa.binary.dev").write_text("0 a dull film .\n1 a \"great\" one\n")
    d = load_glue(tmp_path / "sst2" / "stsa.binary.dev")
    assert d.task == "sst2" and d.labels == [0, 1] and d.texts[1] == ('a "great" one', None)
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nfine \" quote\t1\nbad\t0\n")
    d = load_glue(tmp_path / "sst2" / "dev.tsv")
    assert d.labels == [1, 0] and d.texts[0] == ('fine " quote', None) and d.num_labels == 2
    (tmp_path / "mrpc").mkdir()
    (tmp_path / "mrpc" / "dev.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                               "1\t1\t2\tHe said \"x.\tHe says x.\n0\t3\t4\tA b.\tC d.\n")
    d = load_glue(tmp_path / "mrpc" / "dev.tsv")
    assert d.task == "mrpc" and d.labels == [1, 0] and d.texts[0] == ('He said "x.', "He says x.")
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n"
                                              "1\tC.\tD.\tentailment\n")
    d = load_glue(tmp_path / "rte" / "dev.tsv")
    assert d.labels == [1, 0] and d.texts[1] == ("C.", "D.")
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "in_domain_dev.tsv").write_text("gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode the.\n")
    d = load_glue(tmp_path / "cola" / "in_domain_dev.tsv")
    assert d.labels == [1, 0] and d.texts[1] == ("Rode the.", None)
    assert len(d.head(1)) == 1


def test_errors(tmp_path):
    p = tmp_path / "mrpc.tsv"
    p.write_text("Quality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\tx\n")
    with pytest.raises(PrunePathError, match="missing column.*#2 String"):
        load_glue(p)
    e = tmp_path / "rte_dev.tsv"
    e.write_text("")
    with pytest.raises(PrunePathError, match="empty.*sentence1, sentence2, label"):
        load_glue(e)
    h = tmp_path / "sst2.tsv"
    h.write_text("sentence\tlabel\n")
    with pytest.raises(PrunePathError, match="no examples"):
        load_glue(h)
    bad = tmp_path / "cola.tsv"
    bad.write_text("src\tx\t\tsentence\n")
    with pytest.raises(PrunePathError, match="not an integer"):
        load_glue(bad)
    with pytest.raises(PrunePathError, match="cannot infer"):
        (tmp_path / "data.tsv").write_text("a\tb\n")
        load_glue(tmp_path / "data.tsv")
    with pytest.raises(PrunePathError, match="unknown GLUE task"):
        load_glue(h, "mnli")


SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.skipif(not SHARED.exists(), reason="shared data folder not present")
@pytest.mark.parametrize("rel,task,n", [("sst2/stsa.binary.dev", "sst2", 872), ("sst2/glue/dev.tsv", "sst2", 872),
                                        ("mrpc/dev.tsv", "mrpc", 408), ("rte/dev.tsv", "rte", 277),
                                        ("cola/in_domain_dev.tsv", "cola", 527)])
def test_shared_files(rel, task, n):
    d = load_glue(SHARED / rel)
    assert d.task == task and len(d) == n and set(d.labels) == {0, 1}
    assert all(a for a, _ in d.texts) and all((b is not None) == (task in ("mrpc", "rte")) for _, b in d.texts)
