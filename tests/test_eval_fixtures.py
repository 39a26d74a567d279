"""Shared helpers for the evaluation tests: a tiny word-level tokenizer and tiny random models (no network)."""

from __future__ import annotations

import torch

import prunepath

N_WORDS = 60


def tiny_tokenizer():
    from conftest import word_tokenizer

    return word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(N_WORDS)],
                          bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_llama(seed: int = 0, vocab: int = 64, layers: int = 2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    prunepath.state_of(m).display_name = "tiny-llama (random)"
    return m


def tiny_converted(seed: int = 0, dtype=torch.float32, router_std: float = 1.0, layers: int = 2):
    """A converted tiny Llama (8 experts of 8 neurons) with random (peaked) routers."""
    m = tiny_llama(seed, layers=layers, dtype=dtype)
    prunepath.moefy(m, neurons_per_expert=8, progress=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for f in prunepath.prunepath_modules(m):
            f.router.weight.copy_(torch.randn(f.router.weight.shape, generator=g, dtype=torch.float64) * router_std)
    return m


def save_tiny_llama(path, seed: int = 0):
    """A tiny Llama and its tokenizer saved as a model directory (what the CLI and recipes load)."""
    tiny_llama(seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_text(n_words: int, seed: int = 0, per_line: int = 12) -> str:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N_WORDS, (n_words,), generator=g).tolist()
    lines = [" ".join(f"w{i}" for i in ids[s:s + per_line]) for s in range(0, n_words, per_line)]
    return "\n".join(lines) + "\n"


import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the two cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
