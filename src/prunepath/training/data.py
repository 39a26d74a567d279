"""Task datasets for the trainer: causal LM text, GLUE-style classification, instruction / summarisation data.

The GLUE and instruction readers belong to :mod:`prunepath.data.glue` and :mod:`prunepath.data.instruct`; this
module only tokenises what they return.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from prunepath.data.corpora import split_documents
from prunepath.data.lm import TensorDictDataset, build_instruct_dataset, build_lm_dataset
from prunepath.errors import PrunePathError
from prunepath.training import selfgen
from prunepath.data.text import load_texts
from prunepath.routing.ffn import is_converted
from prunepath.routing.control import routing_scope
from prunepath.data.glue import load_glue
from prunepath.data.instruct import load_examples


def encode_classification(texts: list[tuple[str, str | None]], labels: list[int], tokenizer,
                          seq_len: int) -> TensorDictDataset:
    """(sentence, optional second sentence) pairs → padded ids, attention mask, token types, label ids."""
    if not texts:
        raise PrunePathError("no classification examples")
    a = [t[0] for t in texts]
    b = [t[1] for t in texts]
    pair = any(x is not None for x in b)
    enc = tokenizer(a, [x or "" for x in b] if pair else None, truncation=True, max_length=seq_len,
                    padding="max_length", return_tensors="pt")
    cols = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(labels, dtype=torch.long)}
    if "token_type_ids" in enc:
        cols["token_type_ids"] = enc["token_type_ids"]
    return TensorDictDataset(**cols)


def _glue(path: str, task: str | None = None):
    return load_glue(path, task=task)


def _examples(path: str) -> list[dict]:
    return load_examples(path)


def glue_num_labels(path: str, task: str | None = None) -> int:
    return int(_glue(path, task).num_labels)


def _default_eval_path(path: str) -> str | None:
    """GLUE-style folders: train.tsv → dev.tsv next to it (also CoLA's in_domain_train → in_domain_dev)."""
    p = Path(path)
    for a, b in (("train", "dev"), ("in_domain_train", "in_domain_dev")):
        if p.stem == a and (p.with_name(f"{b}{p.suffix}")).exists():
            return str(p.with_name(f"{b}{p.suffix}"))
    if p.is_dir():
        for name in ("dev.tsv", "in_domain_dev.tsv"):
            if (p / name).exists():
                return str(p / name)
    return None


def _self_texts(cfg, tokenizer, n_tokens: int, model, split: str, should_stop=None) -> tuple[list[str], dict]:
    """The self-distillation corpus's documents of ``split`` (generated once, then read from the cache)."""

    opts = dict(cfg.self_corpus or {})
    unknown = set(opts) - set(selfgen.SelfCorpusSettings.__dataclass_fields__) - {"tokens"}
    if unknown:
        raise PrunePathError(f"self_corpus: unknown key(s) {', '.join(sorted(unknown))}; known: prompt_tokens, "
                             "new_tokens, temperature, top_p, chat_fraction, prompts, seed, batch_size")
    settings = selfgen.SelfCorpusSettings(tokens=n_tokens, **{"seed": cfg.seed, **opts})
    path = selfgen.cache_path(cfg.model, settings)
    if not path.exists():
        if model is None:
            raise PrunePathError(f"the self-distillation corpus {path.name} is not cached and no model was given "
                                 "to sample it from")
        device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        model.to(device)
        # A converted model with every expert on and gates off computes the original function.
        ctx = routing_scope(model, rule="all", gates=False) if is_converted(model) \
            else contextlib.nullcontext()
        with ctx:
            path = selfgen.self_corpus(model, tokenizer, settings, model_name=cfg.model, progress=cfg.progress,
                                       should_stop=should_stop)
    docs = selfgen.load_self_documents(path)
    texts = [d["text"] for d in split_documents(docs, split, cfg.valid_fraction, cfg.seed)]
    return texts, {"self_corpus": str(path), "self_docs": len(docs)}


def build_task_data(cfg, tokenizer, *, max_train_tokens: int | None = None, block_bos: bool = False,
                    model=None, should_stop=None):
    """(train dataset, eval dataset or None, info) for ``cfg.task`` / ``cfg.data`` / ``cfg.eval_data``;
    ``block_bos``: LM blocks start with BOS (models that need it, as the evaluator's windows do). ``model``
    (the original model) samples a ``self:N`` corpus when it is not cached yet."""

    if not cfg.data:
        raise PrunePathError("--data is required: a named corpus (sotu, brown, austen, kjv, moby-dick, mix), a "
                             "text / JSON(L) file, a GLUE-style TSV (--task classify) or hf:NAME")
    info: dict = {"data": cfg.data}
    n_self, rest = selfgen.parse_spec(cfg.data)
    if n_self is not None and cfg.task != "lm":
        raise PrunePathError("data: self:N (a self-distillation corpus) is for --task lm")
    if cfg.task == "lm":
        texts: list[str] = []
        if n_self is not None:
            texts, self_info = _self_texts(cfg, tokenizer, n_self, model, "train", should_stop)
            info.update(self_info)
        if rest is not None:
            texts += load_texts(rest, "train", valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                                text_field=cfg.text_field)
        cap = cfg.max_train_tokens or max_train_tokens
        train = build_lm_dataset(texts, tokenizer, cfg.seq_len, max_tokens=cap, shuffle_seed=cfg.seed,
                                 block_bos=block_bos)
        if cfg.eval_data:
            ev_texts = load_texts(cfg.eval_data, "all", text_field=cfg.text_field)
        else:
            ev_texts = _self_texts(cfg, tokenizer, n_self, model, "validation")[0] if n_self is not None else []
            if rest is not None:
                ev_texts += load_texts(rest, "validation", valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                                       text_field=cfg.text_field)
        ev = build_lm_dataset(ev_texts, tokenizer, cfg.seq_len, max_tokens=cfg.max_eval_tokens,
                              shuffle_seed=None, block_bos=block_bos) if ev_texts else None
        info.update(train_docs=len(texts), eval_docs=len(ev_texts), block_bos=block_bos)
    elif cfg.task == "instruct":
        ex = _examples(cfg.data)
        ev_ex = _examples(cfg.eval_data) if cfg.eval_data else None
        if ev_ex is None and len(ex) >= 20:
            # Hold out a deterministic 5 % of the examples (by position after a seeded shuffle).
            import random
            order = list(range(len(ex)))
            random.Random(cfg.seed).shuffle(order)
            k = max(1, int(len(ex) * cfg.valid_fraction))
            ev_ex = [ex[i] for i in order[:k]]
            ex = [ex[i] for i in order[k:]]
        train = build_instruct_dataset(ex, tokenizer, cfg.seq_len)
        ev = build_instruct_dataset(ev_ex, tokenizer, cfg.seq_len) if ev_ex else None
        info.update(train_examples=len(train), eval_examples=len(ev) if ev else 0)
    else:
        g = _glue(cfg.data, cfg.glue_task)
        train = encode_classification(g.texts, g.labels, tokenizer, cfg.seq_len)
        ev_path = cfg.eval_data or _default_eval_path(cfg.data)
        ev = None
        if ev_path:
            ge = _glue(ev_path, cfg.glue_task or g.task)
            ev = encode_classification(ge.texts, ge.labels, tokenizer, cfg.seq_len)
        info.update(glue_task=g.task, num_labels=g.num_labels, train_examples=len(train),
                    eval_examples=len(ev) if ev else 0, eval_data=ev_path)
    return train, ev, info
