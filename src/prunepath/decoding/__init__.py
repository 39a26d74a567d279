"""Fast decoding: a static-cache, CUDA-graph decode engine with the PrunePath sparse FFN kernels.

``generate(model, tokenizer, prompt, max_new_tokens, tau=..., temperature=..., device=...)`` is the entry
point; :class:`DecodeEngine` is the engine behind it (one per model, batch size and maximum length, cached on
the model). On a machine without CUDA, ``generate`` falls back to the pure-PyTorch path (the model's own
``generate``) and says so.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.conversion.moefy import is_converted
from prunepath.decoding.engine import DecodeEngine
from prunepath.kernels._common import interpreting
from prunepath.routing.control import routing as routing_ctx
from prunepath.models.arch import DECODE_MODEL_TYPES, max_positions
from prunepath.state import state_of

__all__ = ["DecodeEngine", "generate"]

KERNELS = ("auto", "triton", "torch")


def __getattr__(name: str):
    if name == "DecodeEngine":
        return DecodeEngine
    raise AttributeError(name)


def _engine_for(model: nn.Module, batch: int, max_len: int, device: torch.device, ffn: str):
    cache = state_of(model).engines
    if cache is None:
        cache = {}
        state_of(model).engines = cache  # engines are tied to this model's weights
    key = (batch, device.type, device.index)
    eng = cache.get(key)
    if eng is None or eng.max_len < max_len:
        cache.pop(key, None)
        # room for later, longer calls, within the model's positions (a short-context model keeps max_len)
        limit = max_positions(model.config) or 256
        eng = DecodeEngine(model, batch=batch, max_len=max(max_len, min(256, limit)), ffn=ffn, device=device)
        cache[key] = eng
    return eng


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | list[str], max_new_tokens: int = 64, *,
             tau: float | None = None, temperature: float = 0.0, device: str | torch.device | None = None,
             kernels: str = "auto", ffn: str = "auto", seed: int | None = None,
             quiet: bool = False) -> str | list[str]:
    """Continue ``prompt`` (a string or a list of equal-length prompts) by up to ``max_new_tokens`` tokens.

    tau: PrunePath budget for this call (a converted model; None keeps the model's). temperature 0 = greedy.
    kernels: "auto" (the Triton engine on CUDA, PyTorch elsewhere), "triton" (the engine; on a CPU only under
    TRITON_INTERPRET=1), "torch" (the model's own generate). Returns the new text (without the prompt).

    The engine keeps its own device copy of the weights (FFNs packed expert-contiguous); to hold a single copy
    on the GPU, keep the model in host memory and pass ``device="cuda"``. The engine is cached on the model
    (one per batch size and device); τ changes between calls reuse its captured graph.
    """

    if kernels not in KERNELS:
        raise PrunePathError(f"kernels must be one of {', '.join(KERNELS)} (got {kernels!r})")
    if max_new_tokens < 1:
        raise PrunePathError("max_new_tokens must be >= 1")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PrunePathError(f"--device {dev} asked for a GPU but none is available here; use --device cpu")
    use_engine = kernels == "triton" or (kernels == "auto" and dev.type == "cuda")
    if kernels == "triton" and dev.type != "cuda" and not interpreting():
        raise PrunePathError("--kernels triton needs a GPU: use --device cuda, or set TRITON_INTERPRET=1 to "
                             "run the Triton kernels on the CPU (slow), or --kernels torch")
    if tau is not None and not is_converted(model):
        raise PrunePathError("tau needs a converted model (prunepath.moefy or a PrunePath checkpoint)")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    enc = [tokenizer(p, return_tensors="pt")["input_ids"][0] for p in prompts]
    if len({len(e) for e in enc}) != 1:
        raise PrunePathError("batched prompts must have the same number of tokens (no padding support yet)")
    input_ids = torch.stack(enc)
    if seed is not None:
        torch.manual_seed(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    settings = {"tau": tau} if tau is not None else {}
    supported = getattr(getattr(model, "config", None), "model_type", None) in DECODE_MODEL_TYPES
    method = state_of(model).config.routing.method if is_converted(model) else "prunepath"
    why = (f"the decode engine does not support {model.config.model_type!r} models" if not supported else
           f"the decode kernels implement the prunepath routing method, not {method!r}" if method != "prunepath"
           else None)
    if use_engine and why:
        if kernels == "triton":
            raise PrunePathError(f"{why}; use --kernels torch")
        if not quiet:
            print(f"prunepath generate: {why}; using the pure-PyTorch path.", file=sys.stderr)
        use_engine = False
    eng = None
    if use_engine:
        try:
            eng = _engine_for(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, dev, ffn)
        except PrunePathError as exc:  # e.g. a baseline routing method or router the kernels do not fuse
            if kernels == "triton":
                raise
            if not quiet:
                print(f"prunepath generate: {exc}; using the pure-PyTorch path.", file=sys.stderr)
    if eng is not None:
        if is_converted(model):
            with routing_ctx(model, **settings) as r:
                eng.sync_routing(r, ffn)  # τ only: device tensors, no recapture
                new = eng.generate(input_ids, max_new_tokens, temperature=temperature, eos_token_id=eos)
        else:
            new = eng.generate(input_ids, max_new_tokens, temperature=temperature, eos_token_id=eos)
    else:
        if not quiet and dev.type != "cuda" and kernels == "auto":
            print("prunepath generate: no CUDA device: using the pure-PyTorch path (the model's own generate; "
                  "every expert is computed and masked, so it is not faster). Use --device cuda for the fast "
                  "decode kernels.", file=sys.stderr)
        model_dev = next(model.parameters()).device
        if model_dev != dev:
            model.to(dev)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=eos)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        ctx = routing_ctx(model, **settings) if settings else _null()
        with ctx:
            out = model.generate(input_ids.to(dev), attention_mask=torch.ones_like(input_ids).to(dev), **kwargs)
        new = out[:, input_ids.shape[1]:]
    texts = []
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts[0] if single else texts


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
