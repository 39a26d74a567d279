"""GPT-2 facts: LayerNorm, learned positions, Conv1D projections ([in, out], transposed here), plain GELU FFN."""

from __future__ import annotations

from torch import nn

from prunepath.errors import PrunePathError
from prunepath.models.arch.view import DecodeView, LayerView

FFN_LINEARS = ("mlp.c_fc", "mlp.c_proj")  # the FFN's linear layers (Conv1D) under its block, as Wanda prunes them


def decode_view(model: nn.Module, max_len: int) -> DecodeView:
    cfg, body = model.config, model.transformer
    if max_len > cfg.n_positions:
        raise PrunePathError(f"max_len {max_len} exceeds GPT-2's {cfg.n_positions} positions")
    layers = []
    for blk in body.h:
        a = blk.attn
        layers.append(LayerView(qkv_w=a.c_attn.weight.t(), qkv_b=a.c_attn.bias, o_w=a.c_proj.weight.t(),
                                o_b=a.c_proj.bias, ln1_w=blk.ln_1.weight, ln1_b=blk.ln_1.bias,
                                ln2_w=blk.ln_2.weight, ln2_b=blk.ln_2.bias))
    return DecodeView(rms=False, eps=float(cfg.layer_norm_epsilon), heads=cfg.n_head, kv_heads=cfg.n_head,
                      head_dim=cfg.n_embd // cfg.n_head, embed=body.wte.weight, wpe=body.wpe.weight,
                      final_w=body.ln_f.weight, final_b=body.ln_f.bias, lm_head=model.lm_head.weight, cos=None,
                      sin=None, layers=layers)
