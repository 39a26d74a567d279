"""Text sources, packing into blocks, instruction masking, and clear errors for bad files."""

import json

import pytest
import torch

from prunepath.data.lm import (IGNORE_INDEX, build_instruct_dataset, build_lm_dataset, pack_blocks,
                               tokenize_documents)
from prunepath.data.text import load_documents, load_texts, split_text_file
from prunepath.errors import PrunePathError
from test_train_helpers import tiny_tokenizer


def test_tokenize_and_pack():
    tok = tiny_tokenizer()
    ids = tokenize_documents(["the cat sat", "a dog"], tok)
    eos = tok.eos_token_id
    assert ids == tok("the cat sat")["input_ids"] + [eos] + tok("a dog")["input_ids"] + [eos]
    assert tokenize_documents(["the cat sat", "a dog"], tok, max_tokens=2) == ids[:2]
    blocks = pack_blocks(list(range(11)), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(PrunePathError, match="fewer than one block"):
        pack_blocks([1, 2], 4)


def test_lm_dataset_shuffles_documents_deterministically():
    tok = tiny_tokenizer()
    docs = [" ".join([w] * 7) for w in ("cat", "dog", "bird", "mat", "log", "tree")]
    a = build_lm_dataset(docs, tok, 8, shuffle_seed=3)
    b = build_lm_dataset(docs, tok, 8, shuffle_seed=3)
    c = build_lm_dataset(docs, tok, 8, shuffle_seed=None)
    assert torch.equal(a.columns["input_ids"], b.columns["input_ids"])
    assert not torch.equal(a.columns["input_ids"], c.columns["input_ids"])
    assert torch.equal(a[0]["labels"], a[0]["input_ids"]) and a[0]["attention_mask"].all()
    assert a.num_tokens == len(a) * 8


def test_instruct_masks_prompt_and_padding():
    tok = tiny_tokenizer()
    ds = build_instruct_dataset([{"prompt": "the cat", "response": "sat on the mat"}], tok, 32,
                                template="{prompt} .")
    row = ds[0]
    p = tok("the cat .", add_special_tokens=False)["input_ids"]
    r = tok("sat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(p) + len(r)
    assert row["input_ids"][:n].tolist() == p + r
    assert row["labels"][: len(p)].eq(IGNORE_INDEX).all()
    assert row["labels"][len(p):n].tolist() == r
    assert row["labels"][n:].eq(IGNORE_INDEX).all() and row["attention_mask"][n:].eq(0).all()
    # Too long: the prompt start is cut, the response kept.
    long = build_instruct_dataset([{"prompt": "the cat " * 30, "response": "sat"}], tok, 16, template="{prompt}")
    assert long[0]["labels"].ne(IGNORE_INDEX).sum() == 2
    with pytest.raises(PrunePathError, match="prompt"):
        build_instruct_dataset([{"instruction": "x"}], tok, 16)


def test_text_file_documents_wikitext_and_paragraphs(tmp_path):
    wiki = " \n = A = \n \n x y \n = = sub = = \n z \n = B = \n \n w \n"
    assert [d.split("\n")[0].strip() for d in split_text_file(wiki)] == ["= A =", "= B ="]
    assert split_text_file("p one\n\np two\n \n\np three") == ["p one", "p two", "p three"]
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"para {i}" for i in range(60)))
    tr, va = load_texts(f, "train"), load_texts(f, "validation")
    assert len(tr) + len(va) == 60 and va and set(tr).isdisjoint(va)


def test_json_jsonl_and_directory_sources(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    (tmp_path / "c.json").write_text(json.dumps(["s1", "s2"]))
    assert load_texts(tmp_path / "a.json", "all") == ["one", "two"]
    assert load_texts(tmp_path / "b.jsonl", "all", text_field="body") == ["x", "y"]
    assert load_texts(tmp_path / "c.json", "all") == ["s1", "s2"]
    d = tmp_path / "docs"
    d.mkdir()
    (d / "1.txt").write_text("first")
    (d / "2.txt").write_text("second")
    assert [x["text"] for x in load_documents(d)] == ["first", "second"]


@pytest.mark.parametrize("name,content,match", [
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.jsonl", '{"text": "a"}\nnope\n', r"bad.jsonl:2 is not valid JSON"),
    ("rec.jsonl", '{"instruction": "a", "output": "b"}\n', "no 'text' field"),
    ("table.tsv", "sentence\tlabel\nx\t1\n", "--task classify"),
    ("bin.txt", "\x00\x01\x02binary", "binary"),
])
def test_wrong_format_errors(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PrunePathError, match=match):
        load_texts(f, "all")


def test_missing_source_error():
    with pytest.raises(PrunePathError, match="no such data file"):
        load_texts("/nonexistent/corpus.txt")


def test_blocks_can_start_with_bos():
    blocks = pack_blocks(list(range(11)), 4, bos=99)
    assert blocks.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]  # seq_len − 1 ids per block
    tok = tiny_tokenizer()
    docs = [" ".join(["cat", "dog", "mat"] * 5) for _ in range(4)]
    plain = build_lm_dataset(docs, tok, 8, shuffle_seed=None)
    led = build_lm_dataset(docs, tok, 8, shuffle_seed=None, block_bos=True)
    assert (led.columns["input_ids"][:, 0] == tok.bos_token_id).all()
    assert not (plain.columns["input_ids"][:, 0] == tok.bos_token_id).all()
    flat = plain.columns["input_ids"].flatten().tolist()
    assert led.columns["input_ids"][:, 1:].flatten().tolist() == flat[: led.columns["input_ids"][:, 1:].numel()]
    assert torch.equal(led.columns["labels"], led.columns["input_ids"])


@pytest.mark.parametrize("arch,want_bos", [("gemma3", True), ("llama", False)])
def test_training_blocks_start_with_bos_for_models_that_need_it(arch, want_bos, monkeypatch, tmp_path):
    import prunepath.training.trainer as trainer_mod
    from conftest import _tiny
    from prunepath.training.config import TrainConfig
    from test_train_helpers import synthetic_docs

    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(synthetic_docs(30)))
    seen = {}
    monkeypatch.setattr(trainer_mod, "train", lambda model, tok, ds, cfg, **kw: seen.update(train=ds, eval=kw["eval_data"]))
    cfg = TrainConfig.from_dict({"task": "lm", "method": "dense", "data": str(data), "seq_len": 16, "batch_size": 2,
                                 "stage1_steps": 1, "stage2_steps": 1, "device": "cpu", "progress": False})
    tok = tiny_tokenizer()
    trainer_mod.train_from_config(_tiny(arch), tok, cfg)
    for ds in (seen["train"], seen["eval"]):
        first = ds.columns["input_ids"][:, 0]
        assert bool((first == tok.bos_token_id).all()) is want_bos


def test_needs_bos_by_model_type_and_tokenizer():
    from conftest import _tiny, word_tokenizer
    from prunepath.models.adapters import needs_bos

    tok = tiny_tokenizer()
    assert needs_bos(_tiny("gemma3"), tok) is True
    assert needs_bos(_tiny("llama"), tok) is False
    tok.add_bos_token = True  # a tokenizer that adds BOS itself asks for it on any model
    assert needs_bos(_tiny("llama"), tok) is True
    no_bos = word_tokenizer(["<pad>", "<eos>", "cat"], pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(PrunePathError, match="needs a BOS token"):
        needs_bos(_tiny("gemma3"), no_bos)
