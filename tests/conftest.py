"""Shared fixtures: tiny random models of every supported architecture (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach the Hub (CI has no network to it); fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def word_tokenizer(tokens, *, split_punctuation: bool = False, **special):
    """A word-level fast tokenizer (no download): token i of ``tokens`` gets id i; ``special`` names the roles,
    e.g. ``pad_token="<pad>"``. ``split_punctuation`` picks the Whitespace pre-tokenizer over WhitespaceSplit."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token=special.get("unk_token")))
    tk.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special)


def _tiny(arch: str):
    import transformers as T

    if arch == "llama":
        cfg = T.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
        return T.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = T.Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
        return T.Qwen2ForCausalLM(cfg)
    if arch == "mistral":
        cfg = T.MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
        return T.MistralForCausalLM(cfg)
    if arch == "gemma3":
        cfg = T.Gemma3TextConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return T.Gemma3ForCausalLM(cfg)
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_inner=64, bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(cfg)
    if arch == "bert":
        cfg = T.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        return T.BertModel(cfg)
    if arch == "roberta":
        cfg = T.RobertaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, pad_token_id=1)
        return T.RobertaModel(cfg)
    if arch == "opt":
        cfg = T.OPTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                          word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1)
        return T.OPTForCausalLM(cfg)
    raise KeyError(arch)


ARCHS = ("llama", "qwen2", "mistral", "gemma3", "gpt2", "bert", "roberta", "opt")


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model("llama")`` → a fresh random model in eval mode (seeded per call)."""
    def make(arch: str, seed: int = 0):
        torch.manual_seed(seed)
        model = _tiny(arch)
        # Random biases so that bias handling is exercised (HF initialises many biases to zero).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
        return model.eval()
    return make


def main_output(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
