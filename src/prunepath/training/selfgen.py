"""Self-distillation corpus: text sampled from the original model itself.

Distilling on text the model would write keeps the student close to the model it started from: the teacher's
distribution is sharp and informative there, and no foreign style (old speeches, novels) pulls the weights away.
Prompts are openings of registry-corpus training documents (a random passage of ``prompt_tokens`` tokens,
continued as raw text) and, for a fraction of them, a chat turn built from such a passage (instruct models also
write assistant answers). Sampling is plain temperature sampling with a top-p cut, batched with left padding.

Data specs the trainer accepts (``TrainConfig.data``):

    self:2000000                              2M sampled tokens only
    self:2000000+mix:sotu,moby-dick,...      the sampled text plus a registry corpus (documents concatenated)

The corpus is cached as JSONL (``PRUNEPATH_CACHE/selfgen/<model>-seed<S>-n<N>-<settings hash>.jsonl``), written
batch by batch to a ``.partial`` file so an interrupted generation continues where it stopped, and renamed when
complete. Every batch has its own seed, so the result does not depend on where a run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunepath.data.text import load_texts
from prunepath.errors import PrunePathError
from prunepath.models.adapters import needs_bos
from prunepath.models.registry import cache_dir

PREFIX = "self:"

# Chat requests wrapped around a passage (our own wording); the answer the model samples is the training text.
CHAT_REQUESTS = (
    "Summarise this passage in a few sentences:\n\n{passage}",
    "Continue this text in the same style:\n\n{passage}",
    "Explain in plain words what this passage is about:\n\n{passage}",
    "Write three questions a reader might ask about this text, and answer them:\n\n{passage}",
    "Rewrite this passage in modern English:\n\n{passage}",
    "What is the main idea here? Give reasons.\n\n{passage}",
    "Write a short story that starts like this:\n\n{passage}",
    "List the key facts in this passage:\n\n{passage}",
)


FORMAT = 2


@dataclass(frozen=True)
class SelfCorpusSettings:
    """How the corpus is sampled (all of it goes into the cache key)."""

    tokens: int                                         # sampled tokens wanted (prompts not counted)
    prompts: str = "mix:sotu,moby-dick,austen,brown"    # where prompt passages come from (training split)
    prompt_tokens: int = 32
    new_tokens: int = 448
    temperature: float = 1.0
    top_p: float = 0.95
    chat_fraction: float = 0.25
    batch_size: int = 64                                # prompts per batch (each batch has its own seed)
    seed: int = 0

    def validate(self) -> None:
        if self.tokens <= 0:
            raise PrunePathError(f"self-corpus size must be > 0 tokens (got {self.tokens}); e.g. data: self:2000000")
        if self.new_tokens < 1 or self.prompt_tokens < 1:
            raise PrunePathError("self-corpus prompt_tokens and new_tokens must be >= 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise PrunePathError("self-corpus sampling needs temperature > 0 and top_p in (0, 1]")
        if not 0 <= self.chat_fraction <= 1:
            raise PrunePathError("self-corpus chat_fraction must be in [0, 1]")
        if self.batch_size < 1:
            raise PrunePathError("self-corpus batch_size must be >= 1")

    def key(self) -> str:
        # format 2: raw prompts start with BOS wherever the model needs it (needs_bos). Format-1 corpora of such
        # models (Gemma) were sampled from BOS-less prompts and are degenerate, so they must not be found again.
        return hashlib.sha1(json.dumps({**asdict(self), "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:10]


def parse_spec(spec: str) -> tuple[int | None, str | None]:
    """``self:N[+REST]`` → (N, REST or None); any other spec → (None, spec)."""
    s = str(spec)
    if not s.startswith(PREFIX):
        return None, s
    head, _, rest = s[len(PREFIX):].partition("+")
    try:
        n = int(float(head.replace("_", "")))
    except ValueError as exc:
        raise PrunePathError(f"data {spec!r}: self:N needs a token count, e.g. self:2000000 or "
                             "self:2000000+mix:sotu,brown") from exc
    if n <= 0:
        raise PrunePathError(f"data {spec!r}: the self-corpus size must be > 0 tokens")
    return n, (rest.strip() or None)


def cache_path(model_name: str, settings: SelfCorpusSettings) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(model_name)).strip("-")[-60:] or "model"
    return cache_dir() / "selfgen" / f"{slug}-seed{settings.seed}-n{settings.tokens}-{settings.key()}.jsonl"


def _passages(settings: SelfCorpusSettings, tokenizer) -> list[list[int]]:
    """Candidate prompt passages: ``prompt_tokens``-token slices of the prompt source's training documents."""
    texts = load_texts(settings.prompts, "train", seed=settings.seed)
    if not texts:
        raise PrunePathError(f"self-corpus: no prompt text in {settings.prompts}")
    rng = random.Random(settings.seed)
    out: list[list[int]] = []
    for t in texts:
        ids = tokenizer(t[:20000], add_special_tokens=False)["input_ids"]
        n = settings.prompt_tokens
        if len(ids) < n:
            continue
        for _ in range(max(1, min(16, len(ids) // (4 * n)))):  # several openings from long documents
            start = rng.randrange(0, len(ids) - n + 1)
            out.append(ids[start:start + n])
    if not out:
        raise PrunePathError(f"self-corpus: every document of {settings.prompts} is shorter than "
                             f"{settings.prompt_tokens} tokens")
    rng.shuffle(out)
    return out


def _chat_prompt(tokenizer, passage: str, request: str) -> list[int] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": request.format(passage=passage)}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def build_prompts(settings: SelfCorpusSettings, tokenizer, count: int, offset: int,
                  passages: list[list[int]], bos_id: int | None = None) -> list[tuple[str, list[int]]]:
    """``count`` prompts (kind, ids) for batch ``offset`` — deterministic in (seed, offset). Raw passages start
    with ``bos_id`` when given (the model's :func:`needs_bos`; a chat template adds its own)."""
    rng = random.Random(settings.seed * 1_000_003 + offset)
    out = []
    for _ in range(count):
        p = passages[rng.randrange(len(passages))]
        if rng.random() < settings.chat_fraction:
            ids = _chat_prompt(tokenizer, tokenizer.decode(p), rng.choice(CHAT_REQUESTS))
            if ids is not None:
                out.append(("chat", ids))
                continue
        out.append(("raw", ([bos_id] if bos_id is not None else []) + list(p)))
    return out


@torch.no_grad()
def sample_batch(model: nn.Module, tokenizer, prompts: list[list[int]], settings: SelfCorpusSettings,
                 seed: int) -> list[list[int]]:
    """Sampled continuations (token ids, cut at the first end-of-sequence) of left-padded ``prompts``."""
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                         temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                         max_new_tokens=settings.new_tokens, pad_token_id=int(pad))
    stop = set(_stop_ids(model, tokenizer))
    rows = []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:cut])
    return rows


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (eos if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: regenerate from its batch on
    return rows


def self_corpus(model: nn.Module, tokenizer, settings: SelfCorpusSettings, *, model_name: str,
                progress: bool = True,
                should_stop: Callable[[], bool] | None = None) -> Path:
    """Sample (or find cached) the self-distillation corpus of ``model``; returns the JSONL path.

    ``model`` must be the original model (or a converted one routed with every expert on and gates off, which
    computes the same function). ``should_stop`` is asked between batches; when it returns True the finished
    batches stay in the ``.partial`` file and :class:`SelfCorpusInterrupted` is raised.
    """
    settings.validate()
    if tokenizer is None:
        raise PrunePathError("a self-distillation corpus needs the model's tokenizer")
    final = cache_path(model_name, settings)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    bs = settings.batch_size
    # Keep whole batches only (a kill can cut one short): each batch has a fixed seed and is redone whole.
    rows = _read_rows(partial)
    per_batch: dict[int, int] = {}
    for r in rows:
        per_batch[r["batch"]] = per_batch.get(r["batch"], 0) + 1
    rows = [r for r in rows if per_batch[r["batch"]] == r["batch_size"]]
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    batches_done = max((r["batch"] for r in rows), default=-1)
    have = sum(r["new_tokens"] for r in rows)
    passages = _passages(settings, tokenizer)
    bos_id = int(tokenizer.bos_token_id) if needs_bos(model, tokenizer) else None
    was_training = model.training
    model.eval()
    bar = tqdm(total=settings.tokens, initial=min(have, settings.tokens), desc="self-corpus", unit="tok",
               disable=not progress, dynamic_ncols=True)
    batch = batches_done + 1
    t0 = time.time()
    try:
        while have < settings.tokens:
            if should_stop is not None and should_stop():
                raise SelfCorpusInterrupted(f"stopped after {have} of {settings.tokens} tokens; re-run to continue")
            prompts = build_prompts(settings, tokenizer, bs, batch, passages, bos_id)
            conts = sample_batch(model, tokenizer, [p for _, p in prompts], settings,
                                 seed=settings.seed * 1_000_003 + batch)
            with open(partial, "a", encoding="utf-8") as f:
                for i, ((kind, p), c) in enumerate(zip(prompts, conts)):
                    text = tokenizer.decode(list(p) + list(c), skip_special_tokens=False)
                    if kind == "raw" and getattr(tokenizer, "bos_token", None) and text.startswith(tokenizer.bos_token):
                        text = text[len(tokenizer.bos_token):]  # the trainer adds BOS itself where needed
                    f.write(json.dumps({"id": f"self-{settings.seed}-{batch}-{i}",
                                        "text": text, "kind": kind, "prompt_tokens": len(p),
                                        "new_tokens": len(c), "batch": batch, "batch_size": bs}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            added = sum(len(c) for c in conts)
            have += added
            bar.update(added)
            bar.set_postfix(tok_s=f"{(have) / max(time.time() - t0, 1e-6):.0f}")
            batch += 1
    finally:
        bar.close()
        model.train(was_training)
    os.replace(partial, final)
    return final


class SelfCorpusInterrupted(PrunePathError):
    """Generation stopped before the corpus was complete; the finished batches are kept."""


def load_self_documents(path: Path) -> list[dict]:
    """The corpus as ``{"id", "text"}`` documents."""
    return [{"id": r["id"], "text": r["text"]} for r in _read_rows(Path(path))]
