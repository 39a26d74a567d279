"""Llama-family facts (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE, grouped-query attention, gated SiLU FFN."""

from __future__ import annotations

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.models.arch.view import DecodeView, LayerView

# The FFN's linear layers under its owner block, as Wanda prunes them: shared by every gated-MLP model of the
# "gated-mlp" adapter (Llama, Mistral, Qwen2/3, SmolLM, Gemma).
FFN_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decode_view(model: nn.Module, max_len: int) -> DecodeView:
    cfg, body = model.config, model.model
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise PrunePathError("partial rotary embeddings are not supported by the decode engine")
    ref = next(model.parameters())
    with torch.no_grad():
        pos = torch.arange(max_len, device=ref.device)[None]
        cos, sin = body.rotary_emb(torch.zeros(1, dtype=torch.float32, device=ref.device), pos)
    layers = []
    for blk in body.layers:
        a = blk.self_attn
        qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
        qkv_b = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0) if a.q_proj.bias is not None else None)
        layers.append(LayerView(qkv_w=qkv_w, qkv_b=qkv_b, o_w=a.o_proj.weight, o_b=a.o_proj.bias,
                                ln1_w=blk.input_layernorm.weight, ln1_b=None,
                                ln2_w=blk.post_attention_layernorm.weight, ln2_b=None))
    return DecodeView(rms=True, eps=float(cfg.rms_norm_eps), heads=cfg.num_attention_heads,
                      kv_heads=cfg.num_key_value_heads, head_dim=head_dim, embed=body.embed_tokens.weight, wpe=None,
                      final_w=body.norm.weight, final_b=None, lm_head=model.lm_head.weight, cos=cos[0], sin=sin[0],
                      layers=layers)
