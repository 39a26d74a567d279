"""Causal-LM datasets: documents → token ids → packed ``seq_len`` blocks, and prompt/response examples with the
prompt masked out of the loss. Items are dicts of 1-D LongTensors (``input_ids``, ``attention_mask``, ``labels``);
``labels`` uses -100 for positions that do not count (padding, prompts)."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch.utils.data import Dataset

from prunepath.errors import PrunePathError

IGNORE_INDEX = -100


class TensorDictDataset(Dataset):
    """Rows of equally-long tensors, returned as dicts (collates with the default collate function)."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {v.shape[0] for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns = columns

    def __len__(self) -> int:
        return next(iter(self.columns.values())).shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}

    @property
    def num_tokens(self) -> int:
        mask = self.columns.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(self.columns["input_ids"].numel())


def tokenize_documents(texts: Sequence[str], tokenizer, *, max_tokens: int | None = None, add_eos: bool = True,
                       add_bos: bool = False, shuffle_seed: int | None = None) -> list[int]:
    """Token ids of the documents, concatenated with EOS between them (optionally BOS before each).

    ``shuffle_seed`` shuffles the document order first (so a token cap samples a mix, not the first source);
    ``max_tokens`` stops once that many ids are collected.
    """
    order = list(range(len(texts)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    eos = tokenizer.eos_token_id if add_eos else None
    bos = tokenizer.bos_token_id if add_bos else None
    ids: list[int] = []
    for i in order:
        piece = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if bos is not None:
            ids.append(bos)
        ids.extend(piece)
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def pack_blocks(ids: Sequence[int], seq_len: int, bos: int | None = None) -> torch.Tensor:
    """[N, seq_len] blocks of consecutive ids (the ragged tail is dropped). With ``bos`` every block is that token
    followed by seq_len − 1 ids: models such as Gemma go far off their distribution without BOS at the start, and
    the evaluator puts it at every window start, so training sees the same."""
    if seq_len < 2:
        raise PrunePathError(f"--seq-len must be at least 2 (got {seq_len})")
    step = seq_len - (bos is not None)
    n = len(ids) // step
    if n == 0:
        raise PrunePathError(f"the data has only {len(ids)} tokens, fewer than one block of --seq-len {seq_len}; "
                             "pass more text or a smaller --seq-len")
    blocks = torch.tensor(list(ids[: n * step]), dtype=torch.long).view(n, step)
    if bos is not None:
        blocks = torch.cat([torch.full((n, 1), int(bos), dtype=torch.long), blocks], 1)
    return blocks


def build_lm_dataset(texts: Sequence[str], tokenizer, seq_len: int, *, max_tokens: int | None = None,
                     shuffle_seed: int | None = 0, add_bos: bool = False,
                     block_bos: bool = False) -> TensorDictDataset:
    """Packed causal-LM blocks; every position counts in the loss (labels = input ids, shifted by the model).
    ``block_bos``: every block starts with the tokenizer's BOS (see :func:`pack_blocks`)."""
    if not texts:
        raise PrunePathError("no text to train on (the split is empty); check --data / --valid-fraction")
    ids = tokenize_documents(texts, tokenizer, max_tokens=max_tokens, shuffle_seed=shuffle_seed, add_bos=add_bos)
    blocks = pack_blocks(ids, seq_len, tokenizer.bos_token_id if block_bos else None)
    return TensorDictDataset(input_ids=blocks, attention_mask=torch.ones_like(blocks), labels=blocks.clone())


PROMPT_TEMPLATE = "{prompt}"  # prunepath.data.instruct already formats the prompt (Alpaca / XSum)


def build_instruct_dataset(examples: Sequence[dict], tokenizer, seq_len: int, *,
                           template: str = PROMPT_TEMPLATE, max_examples: int | None = None) -> TensorDictDataset:
    """Prompt/response pairs as causal LM with the prompt (and padding) masked out of the loss.

    Each example becomes one row of ``seq_len`` tokens: template(prompt) + response + EOS, right-padded. Too
    long examples lose the start of the prompt first (the response is what is learned), keeping at least
    a quarter of the row for the prompt.
    """
    if not examples:
        raise PrunePathError("no instruction examples to train on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise PrunePathError("the tokenizer has neither a pad nor an EOS token; instruction data needs one")
    eos = tokenizer.eos_token_id
    rows, masks, labels = [], [], []
    for ex in list(examples)[: max_examples or None]:
        if "prompt" not in ex or "response" not in ex:
            raise PrunePathError(f"an instruction example needs 'prompt' and 'response' (got keys {sorted(ex)})")
        p = tokenizer(template.format(prompt=ex["prompt"]), add_special_tokens=False)["input_ids"]
        r = tokenizer(str(ex["response"]), add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        budget_p = max(seq_len // 4, seq_len - len(r))
        p = p[-budget_p:] if len(p) > budget_p else p
        r = r[: seq_len - len(p)]
        if not r:
            continue
        ids = p + r
        lab = [IGNORE_INDEX] * len(p) + r
        n_pad = seq_len - len(ids)
        rows.append(ids + [pad] * n_pad)
        masks.append([1] * len(ids) + [0] * n_pad)
        labels.append(lab + [IGNORE_INDEX] * n_pad)
    if not rows:
        raise PrunePathError(f"no example fits in --seq-len {seq_len}; raise it")
    return TensorDictDataset(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks),
                             labels=torch.tensor(labels))
