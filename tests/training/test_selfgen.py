"""Self-distillation corpus: sampling, caching, resume, the data spec and its use as training data."""

from __future__ import annotations

import json

import pytest
import torch

from prunepath.errors import PrunePathError
from prunepath.training import selfgen
from tests.conftest import word_tokenizer

WORDS = [f"w{i}" for i in range(90)]


@pytest.fixture
def tok():
    return word_tokenizer(["<pad>", "<unk>", "</s>"] + WORDS, pad_token="<pad>", unk_token="<unk>",
                          eos_token="</s>")


@pytest.fixture
def prompt_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "prompts.txt"
    paras = [" ".join(WORDS[int(i)] for i in torch.randint(0, 90, (60,), generator=g)) for _ in range(6)]
    path.write_text("\n\n".join(paras) + "\n")
    return str(path)


@pytest.fixture
def model(tiny_model):
    m = tiny_model("llama")
    m.generation_config.eos_token_id = 2  # "</s>"
    return m


def settings(prompts, tokens=40, **kw):
    return selfgen.SelfCorpusSettings(tokens=tokens, prompts=prompts, prompt_tokens=5, new_tokens=6,
                                      chat_fraction=0.0, batch_size=3, **kw)


def test_parse_spec():
    assert selfgen.parse_spec("self:2000000") == (2000000, None)
    assert selfgen.parse_spec("self:1e6+mix:sotu,brown") == (1000000, "mix:sotu,brown")
    assert selfgen.parse_spec("mix:sotu") == (None, "mix:sotu")
    for bad in ("self:0", "self:-5", "self:abc", "self:"):
        with pytest.raises(PrunePathError):
            selfgen.parse_spec(bad)


def test_settings_validate():
    with pytest.raises(PrunePathError, match="> 0"):
        selfgen.SelfCorpusSettings(tokens=0).validate()
    with pytest.raises(PrunePathError):
        selfgen.SelfCorpusSettings(tokens=10, top_p=0).validate()


def test_sample_batch_left_padding_matches_argmax_reference(model, tok):
    """With top-p that keeps one token, sampling is greedy: each left-padded row must equal a plain float64
    argmax loop over that prompt alone."""
    s = selfgen.SelfCorpusSettings(tokens=10, new_tokens=5, top_p=1e-9)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    got = selfgen.sample_batch(model, tok, prompts, s, seed=0)
    ref_model = model.double()
    for p, g in zip(prompts, got):
        ids = torch.tensor([p])
        want = []
        for _ in range(5):
            nxt = int(ref_model(input_ids=ids).logits[0, -1].argmax())
            if nxt == 2:
                break
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert g == want


def test_corpus_cached_deterministic_and_resumable(model, tok, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "a"))
    st = settings(prompt_file)
    full = selfgen.self_corpus(model, tok, st, model_name="tiny", progress=False)
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert sum(r["new_tokens"] for r in rows) >= st.tokens
    assert full.name.startswith("tiny-seed0-n40-") and full.parent.name == "selfgen"
    # cached: a second call samples nothing
    monkeypatch.setattr(selfgen, "sample_batch", lambda *a, **k: pytest.fail("sampled again"))
    assert selfgen.self_corpus(model, tok, st, model_name="tiny", progress=False) == full
    monkeypatch.undo()

    # interrupted after the first batch, then resumed in a fresh cache: the same file as uninterrupted
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "b"))
    calls = {"n": 0}

    def stop_after_one():
        calls["n"] += 1
        return calls["n"] > 1
    with pytest.raises(selfgen.SelfCorpusInterrupted):
        selfgen.self_corpus(model, tok, st, model_name="tiny", progress=False,
                            should_stop=stop_after_one)
    partial = selfgen.cache_path("tiny", st).with_name(selfgen.cache_path("tiny", st).name + ".partial")
    assert {json.loads(line)["batch"] for line in partial.read_text().splitlines()} == {0}
    # a kill mid-batch leaves a half batch and a cut line: both are dropped and redone
    with open(partial, "a") as f:
        f.write(json.dumps({"id": "x", "text": "w1", "new_tokens": 1, "batch": 1, "batch_size": 3}) + "\n{\"cut")
    resumed = selfgen.self_corpus(model, tok, st, model_name="tiny", progress=False)
    assert resumed.read_text() == full.read_text()
    # another seed is another corpus
    other = selfgen.self_corpus(model, tok, settings(prompt_file, seed=1), model_name="tiny",
                                progress=False)
    assert other != resumed and other.read_text() != resumed.read_text()


def test_chat_prompts_use_the_template(tok, prompt_file):
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %}{% if add_generation_prompt %} w3{% endif %}"
    st = selfgen.SelfCorpusSettings(tokens=10, prompts=prompt_file, prompt_tokens=4, chat_fraction=1.0)
    passages = selfgen._passages(st, tok)
    prompts = selfgen.build_prompts(st, tok, 4, 0, passages)
    assert all(kind == "chat" for kind, _ in prompts)
    w1, w3 = tok.convert_tokens_to_ids("w1"), tok.convert_tokens_to_ids("w3")
    assert all(ids[0] == w1 and ids[-1] == w3 for _, ids in prompts)
    assert selfgen.build_prompts(st, tok, 4, 0, passages) == prompts  # deterministic in (seed, batch)


def test_training_data_mixes_self_corpus_and_text(model, tok, prompt_file, tmp_path, monkeypatch):
    from prunepath.training.config import TrainConfig
    from prunepath.training.data import build_task_data

    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "c"))
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(" ".join(["w89"] * 30) for _ in range(20)) + "\n")
    cfg = TrainConfig(model="tiny", data=f"self:40+{other}", seq_len=8, device="cpu", valid_fraction=0.0,
                      self_corpus={"prompts": prompt_file, "prompt_tokens": 5, "new_tokens": 6,
                                   "chat_fraction": 0.0, "batch_size": 3}, progress=False)
    train, _, info = build_task_data(cfg, tok, model=model)
    ids = train.columns["input_ids"] if hasattr(train, "columns") else torch.stack([r["input_ids"] for r in train])
    w89 = tok.convert_tokens_to_ids("w89")
    frac = (ids == w89).float().mean().item()
    assert 0.2 < frac < 0.95  # both sources are in the blocks
    assert info["self_corpus"].endswith(".jsonl")
    with pytest.raises(PrunePathError, match="unknown key"):
        build_task_data(TrainConfig(model="tiny", data="self:40", self_corpus={"tempo": 1}, device="cpu"), tok,
                        model=model)
    with pytest.raises(PrunePathError, match="self:N"):
        build_task_data(TrainConfig(model="tiny", task="classify", data="self:40", device="cpu"), tok, model=model)


def test_cli_checks_before_loading(monkeypatch, capsys, tmp_path):
    """`prunepath self-corpus` rejects a size <= 0 and bad sampling settings before any model loads, and reports a
    cached corpus without loading one."""
    import prunepath
    from prunepath.cli.main import main

    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path))
    monkeypatch.setattr(prunepath, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for args, msg in ((["--tokens", "0"], "> 0"), (["--tokens", "10", "--top-p", "0"], "top_p"),
                      (["--tokens", "10", "--batch-size", "0"], "batch_size")):
        assert main(["self-corpus", "--model", "smollm2-135m", *args]) == 2
        assert msg in capsys.readouterr().err
    st = selfgen.SelfCorpusSettings(tokens=10)
    path = selfgen.cache_path("smollm2-135m", st)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"id": "a", "text": "x", "new_tokens": 10, "batch": 0, "batch_size": 1}) + "\n")
    assert main(["self-corpus", "--model", "smollm2-135m", "--tokens", "10", "--batch-size", "64"]) == 0
    assert "cached" in capsys.readouterr().out


def test_models_that_need_bos_get_it_at_every_raw_prompt(tiny_model, prompt_file, tmp_path, monkeypatch):
    """Gemma's corpus was sampled from BOS-less prompts (the tokenizer does not say it adds one) and came out as
    repetition loops; the prompts now follow needs_bos, the stored text carries no BOS (the trainer adds it), and
    a corpus cached under the earlier key format is not picked up again."""
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path))
    tok = word_tokenizer(["<pad>", "<unk>", "</s>", "<bos>"] + WORDS, pad_token="<pad>", unk_token="<unk>",
                         eos_token="</s>", bos_token="<bos>")
    bos = tok.convert_tokens_to_ids("<bos>")
    model = tiny_model("gemma3")
    model.generation_config.eos_token_id = 2
    seen = []
    real = selfgen.sample_batch

    def spy(m, t, prompts, st, seed):
        seen.extend(prompts)
        return real(m, t, prompts, st, seed)

    monkeypatch.setattr(selfgen, "sample_batch", spy)
    st = settings(prompt_file, tokens=12)
    path = selfgen.self_corpus(model, tok, st, model_name="tiny-gemma", progress=False)
    assert seen and all(p[0] == bos and bos not in p[1:] for p in seen)
    assert all(not r["text"].startswith("<bos>") for r in selfgen._read_rows(path))
    # a model that does not need BOS (llama, tokenizer without add_bos_token) gets none
    seen.clear()
    llama = tiny_model("llama")
    llama.generation_config.eos_token_id = 2
    selfgen.self_corpus(llama, tok, settings(prompt_file, tokens=12, seed=3), model_name="tiny-llama", progress=False)
    assert seen and all(bos not in p for p in seen)
    # the key covers the prompt format: the format-1 file of the same settings is a different name
    import hashlib
    from dataclasses import asdict
    old_key = hashlib.sha1(json.dumps(asdict(st), sort_keys=True).encode()).hexdigest()[:10]
    assert old_key != st.key() and old_key not in path.name
