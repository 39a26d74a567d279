"""Expert-contiguous weight layouts for the decode kernels.

``pack_ffn`` turns a converted :class:`~prunepath.routing.ffn.PrunePathFFN` into one :class:`PackedFFN`:

* gated FFNs: ``w_in`` [E, 2n, d] holds, per expert, its n gate rows then its n up rows (one contiguous block);
* plain FFNs: ``w_in`` [E, n, d] holds W_1's rows, ``b_in`` [E, n] its bias;
* ``w_out`` [E, n, d] holds W_down / W_2 transposed, so expert e's [n, d] block is contiguous and each row
  is read coalesced; ``b_out`` [d] is the shared output bias (applied once, never gated);
* ``router_w`` [E, d] (the bias-free linear router) and ``always_on`` (int8 [E]).

``pack_ffn`` and ``random_packed_ffn`` store the router rows directly after ``w_in`` in one buffer
(:func:`fuse_router`), so ``PackedFFN.w_in_router()`` is a zero-copy [E·R + E, d] view: one cuBLAS GEMM gives
the pre-activations of every expert and the router logits (the dense-equivalent path, prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prunepath.errors import PrunePathError
from prunepath.routing.ffn import PrunePathFFN

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")


def _act_reference(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "relu":
        return torch.relu(x)
    raise PrunePathError(f"unknown activation {name!r}; kernels support {', '.join(ACTIVATIONS)}")


def detect_activation(act: nn.Module | str) -> str:
    """Name the activation a module computes (silu, gelu_tanh, gelu, relu) by evaluating it on a probe.

    Probing beats matching class names: transformers has many spellings of the same function.
    """
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise PrunePathError(f"unknown activation {act!r}; kernels support {', '.join(ACTIVATIONS)}")
        return act
    probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    with torch.no_grad():
        try:
            got = act(probe.float()).double()
        except Exception as exc:  # noqa: BLE001 - any failure means "not one we know"
            raise PrunePathError(f"cannot evaluate activation {type(act).__name__}: {exc}") from exc
    for name in ACTIVATIONS:
        if torch.allclose(got, _act_reference(name, probe), atol=2e-5, rtol=1e-4):
            return name
    raise PrunePathError(
        f"activation {type(act).__name__} is none of {', '.join(ACTIVATIONS)}; the decode kernels cannot run it "
        "(use the PyTorch path: --kernels torch)")


@dataclass
class PackedFFN:
    """One FFN layer in the kernels' expert-contiguous layout (see the module docstring)."""

    w_in: torch.Tensor  # [E, R, d], R = 2n (gated: gate rows then up rows) or n
    b_in: torch.Tensor | None  # [E, R] or None
    w_out: torch.Tensor  # [E, n, d]
    b_out: torch.Tensor | None  # [d] or None
    router_w: torch.Tensor  # [E, d]
    always_on: torch.Tensor  # int8 [E]
    activation: str
    gated: bool
    layer_index: int = 0

    @property
    def num_experts(self) -> int:
        return self.w_out.shape[0]

    @property
    def neurons_per_expert(self) -> int:
        return self.w_out.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.w_out.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    @property
    def device(self) -> torch.device:
        return self.w_in.device

    def nbytes(self) -> int:
        ts = [self.w_in, self.b_in, self.w_out, self.b_out, self.router_w, self.always_on]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def w_in_router(self) -> torch.Tensor | None:
        """[E·R + E, d] view over w_in's rows followed by the router's, when they share one buffer (else None)."""
        e, r, d = self.w_in.shape
        w, rt = self.w_in, self.router_w
        if (rt.dtype != w.dtype or rt.device != w.device or not w.is_contiguous() or not rt.is_contiguous()
                or rt.shape != (e, d)):
            return None
        if w.untyped_storage().data_ptr() != rt.untyped_storage().data_ptr():
            return None
        if rt.data_ptr() != w.data_ptr() + w.numel() * w.element_size():
            return None
        return w.as_strided((e * r + e, d), (d, 1))

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Views for a dense (cuBLAS) pass over all experts: w_in as [E·R, d], b_in [E·R], w_out as [E·n, d]."""
        e, r, d = self.w_in.shape
        b = self.b_in.reshape(e * r) if self.b_in is not None else None
        return self.w_in.reshape(e * r, d), b, self.w_out.reshape(e * self.neurons_per_expert, d)


def fuse_router(w_in: torch.Tensor, router_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy w_in [E, R, d] and router_w [E, d] into one buffer (router rows last); returns views of it."""
    e, r, d = w_in.shape
    buf = torch.empty(e * r + e, d, dtype=w_in.dtype, device=w_in.device)
    buf[: e * r].copy_(w_in.reshape(e * r, d))
    buf[e * r:].copy_(router_w.to(w_in.dtype))
    return buf[: e * r].view(e, r, d), buf[e * r:]


def pack_ffn(ffn: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> PackedFFN:
    """Pack a converted FFN (``PrunePathFFN``) into the kernels' layout.

    ``dtype`` defaults to bf16 on CUDA and the module's dtype elsewhere. The router must be the default
    bias-free linear router (the kernels fuse it).
    """

    if not isinstance(ffn, PrunePathFFN):
        raise PrunePathError(f"pack_ffn needs a PrunePathFFN (convert the model with prunepath.moefy first), "
                             f"got {type(ffn).__name__}")
    router = ffn.router
    if not isinstance(router, nn.Linear) or router.bias is not None:
        raise PrunePathError(f"the decode kernels fuse the default bias-free linear router; this layer has "
                             f"{type(router).__name__}. Use the PyTorch path (--kernels torch)")
    ref = ffn.up_proj.weight
    device = torch.device(device) if device is not None else ref.device
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else ref.dtype
    e, n = ffn.num_experts, ffn.neurons_per_expert
    d = ffn.hidden_size
    kw = {"dtype": dtype, "device": device}
    with torch.no_grad():
        up = ffn.up_proj.weight.detach().reshape(e, n, d)
        if ffn.gated:
            gate = ffn.gate_proj.weight.detach().reshape(e, n, d)
            w_in = torch.cat([gate.to(**kw), up.to(**kw)], dim=1).contiguous()
            biases = [ffn.gate_proj.bias, ffn.up_proj.bias]
            b_in = None
            if any(b is not None for b in biases):
                parts = [(b.detach() if b is not None else torch.zeros(e * n, device=ref.device)).reshape(e, n)
                         for b in biases]
                b_in = torch.cat(parts, dim=1).to(device=device, dtype=torch.float32).contiguous()
        else:
            w_in = up.to(**kw).contiguous()
            b_in = (ffn.up_proj.bias.detach().reshape(e, n).to(device=device, dtype=torch.float32).contiguous()
                    if ffn.up_proj.bias is not None else None)
        w_out = ffn.down_proj.weight.detach().t().reshape(e, n, d).to(**kw).contiguous()
        b_out = (ffn.down_proj.bias.detach().to(device=device, dtype=torch.float32).contiguous()
                 if ffn.down_proj.bias is not None else None)
        w_in, router_w = fuse_router(w_in, router.weight.detach().to(**kw))
        always_on = ffn.always_on.detach().to(device=device, dtype=torch.int8).contiguous()
    return PackedFFN(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, router_w=router_w, always_on=always_on,
                     activation=detect_activation(ffn.act_fn), gated=ffn.gated, layer_index=ffn.layer_index)


def random_packed_ffn(hidden: int, num_experts: int, neurons: int, *, gated: bool = True, activation: str = "silu",
                      bias: bool = False, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                      router_std: float = 1.0, generator: torch.Generator | None = None) -> PackedFFN:
    """A PackedFFN with random weights (benchmarks and tests): weights ~ N(0, 1/d) so outputs stay O(1)."""
    g = generator
    r = 2 * neurons if gated else neurons
    s = 1.0 / math.sqrt(hidden)

    def rnd(*shape: int, std: float = s, dt: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dt)

    w_in, router_w = fuse_router(rnd(num_experts, r, hidden), rnd(num_experts, hidden, std=router_std * s))
    return PackedFFN(
        w_in=w_in, b_in=rnd(num_experts, r, std=0.1, dt=torch.float32) if bias else None,
        w_out=rnd(num_experts, neurons, hidden, std=1.0 / math.sqrt(num_experts * neurons)),
        b_out=rnd(hidden, std=0.1, dt=torch.float32) if bias else None,
        router_w=router_w,
        always_on=torch.zeros(num_experts, dtype=torch.int8, device=device),
        activation=activation, gated=gated)
