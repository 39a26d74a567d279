"""``prunepath self-corpus``: sample (or find cached) a self-distillation corpus from the original model, for
``--data self:N`` in training (prunepath.training.selfgen)."""

from __future__ import annotations

import argparse

from prunepath.cli.common import add_model_arg, resolve_device
from prunepath.errors import PrunePathError
from prunepath.training import selfgen
import prunepath


def register(sub) -> None:
    p = sub.add_parser(
        "self-corpus", help="sample text from the original model for self-distillation (data: self:N)",
        description="Sample N tokens of text from the model itself (prompts: passages of the registry corpora's "
                    "training documents, some wrapped in a chat turn), cached as JSONL under "
                    "PRUNEPATH_CACHE/selfgen keyed by model, seed, size and sampling settings. Training with "
                    "`--data self:N` (or self:N+mix:...) and the same --seed reads it; without this command the "
                    "trainer samples it itself. Interrupted runs continue where they stopped.")
    add_model_arg(p)
    p.add_argument("--tokens", type=int, required=True, help="sampled tokens wanted (prompts not counted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts sampled at once (part of the corpus's identity: each batch has its own seed)")
    p.add_argument("--new-tokens", type=int, default=448, help="tokens sampled per prompt at most")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--chat-fraction", type=float, default=0.25, help="prompts wrapped in a chat turn")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch


    settings = selfgen.SelfCorpusSettings(tokens=args.tokens, seed=args.seed, new_tokens=args.new_tokens,
                                          temperature=args.temperature, top_p=args.top_p,
                                          chat_fraction=args.chat_fraction, batch_size=args.batch_size)
    settings.validate()  # before the model loads
    device = resolve_device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                            ("cpu" if args.device == "auto" else args.device))
    path = selfgen.cache_path(args.model, settings)
    if path.exists():
        print(f"cached: {path}")
        return 0
    model, tok = prunepath.load_model(args.model)
    if prunepath.is_converted(model):
        raise PrunePathError(f"{args.model} is a PrunePath checkpoint; sample from the original model it came from")
    if tok is None:
        raise PrunePathError(f"{args.model} has no tokenizer")
    model.to(device)
    path = selfgen.self_corpus(model, tok, settings, model_name=args.model, progress=args.progress)
    docs = selfgen.load_self_documents(path)
    print(f"wrote {path}: {len(docs)} documents")
    return 0
