"""Shared helpers for the training tests: a tiny Llama, a word-level tokenizer and synthetic text (no network)."""

from __future__ import annotations

import random

import torch

WORDS = ("the cat dog bird sat ran flew on under over a mat log tree and then quickly slowly big small red "
         "blue green house river hill saw ate found").split()


def tiny_tokenizer():
    from conftest import word_tokenizer

    return word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", ".", *WORDS], pad_token="<pad>", eos_token="<eos>",
                          bos_token="<bos>", unk_token="<unk>")


def synthetic_docs(n_docs: int = 40, seed: int = 0) -> list[str]:
    """Documents with learnable structure (a tiny grammar), so the LM loss can fall in a few dozen steps."""
    rng = random.Random(seed)
    subj, verb, prep, obj = ["the cat", "the dog", "a bird"], ["sat", "ran", "flew"], ["on", "under", "over"], \
        ["the mat", "a log", "the tree", "the house"]
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(5, 12)):
            sents.append(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(prep)} {rng.choice(obj)} .")
        docs.append(" ".join(sents))
    return docs


def tiny_llama(seed: int = 0, vocab_size: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return LlamaForCausalLM(cfg)


def tiny_lm_data(seq_len: int = 32, n_docs: int = 40, seed: int = 0):
    from prunepath.data.lm import build_lm_dataset

    return build_lm_dataset(synthetic_docs(n_docs, seed), tiny_tokenizer(), seq_len)


def one_thread():
    """Context: a single torch thread. Tiny models on 2 shared cores run ~8x faster without thread contention."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
    return ctx()


def test_helpers_build_a_trainable_setup():
    tok = tiny_tokenizer()
    ds = tiny_lm_data(seq_len=16, n_docs=4)
    assert len(ds) > 0 and int(ds[0]["input_ids"].max()) < tiny_llama().config.vocab_size
    assert tok.decode(tok("the cat sat .")["input_ids"]) == "the cat sat ."
