"""Fused LoRA projections: the frozen (4-bit, 8-bit or 16-bit) weight and the adapter in one
autograd function per group of projections that read the same input.

Why by hand: PEFT runs a LoRA projection as separate modules (the bitsandbytes matmul with its
own autograd function, then lora_A, lora_B, a scale and an add), and autograd sums the input
gradients of q, k and v (and of gate and up) with extra kernels; no maintained library offers a
fused LoRA linear over bitsandbytes weights that runs on CPU and GPU alike (Unsloth's
`fast_lora.py` does, but only inside Unsloth's own model code and with Triton). This is the
same idea in plain torch:

    Y_i = X·W_iᵀ + s_i·(X·A_iᵀ)·B_iᵀ         for every projection i of a group (q/k/v; gate/up)

with the LoRA term added inside the GEMM (`addmm_`), and a backward that saves only X and the
small X·A_iᵀ (N × r): W_i is dequantized again by bitsandbytes' own kernels (into a reused
buffer), so no full-size weight is ever kept for the backward, and dX of the group is one
accumulated buffer.

Hooked in without replacing modules: `apply_fused_lora(model)` patches the `forward` of PEFT's
LoRA layers (an instance attribute), so state-dict keys, PEFT saving and loading, merging and
`disable_adapter()` stay PEFT's. Where the fused path does not apply (LoRA dropout > 0, DoRA or
another variant, several or no active adapters, merged or disabled adapters, no gradient
needed, e.g. evaluation and generation, where bitsandbytes' inference kernels are faster) the
layer runs PEFT's own forward.

Siblings (q/k/v in one attention block, gate/up in one MLP) are computed together when the
first of them is called: the others' outputs wait in the group until their own call with the
same input tensor, which Gemma's attention and MLP make right after.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# projections that read the same input in a Gemma decoder layer, computed together
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_BUFFERS: dict[tuple, torch.Tensor] = {}


def _buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One reused tensor per weight shape: every projection of that shape dequantizes into it.
    Safe because a buffer is read by the one GEMM that follows its filling, in stream order, and
    never saved for the backward."""
    key = (tuple(shape), dtype, device)
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def _kind(base: nn.Module) -> str | None:
    """4bit, 8bit, 16bit (a plain nn.Linear), or None for a layer the fused path does not know."""
    try:
        import bitsandbytes as bnb

        if isinstance(base, bnb.nn.Linear4bit):
            return "4bit"
        if isinstance(base, bnb.nn.Linear8bitLt):
            return "8bit" if not base.state.has_fp16_weights else "16bit"
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    return "16bit" if type(base) is nn.Linear else None


def dequantized_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight of `base` as a (out, in) tensor of `dtype`, through bitsandbytes' own
    dequantization (4-bit: `dequantize_4bit` of the packed data and its quant state, which also
    holds after bitsandbytes' CPU repacking is undone; 8-bit: its int8 rows times their scales)."""
    kind, weight = _kind(base), base.weight
    if kind == "4bit":
        import bitsandbytes.functional as F
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)  # as bitsandbytes' own forward: FSDP drops it
        weight = base.weight
        state = weight.quant_state
        # torch.compile traces bitsandbytes' out= variant with a fake-tensor shape check that fails
        # (bitsandbytes 0.50): compiled code gets a fresh tensor, which inductor plans anyway
        if state.dtype == dtype and weight.device.type == "cuda" and not torch.compiler.is_compiling():
            return F.dequantize_4bit(weight.data, state, out=_buffer(state.shape, dtype, weight.device))
        return F.dequantize_4bit(weight.data, state).to(dtype)
    if kind == "8bit":
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        cb = weight.data if weight.dtype == torch.int8 else base.state.CB
        # int8 × a per-row scale, promoted to `dtype` in one kernel (int8 values are exact in bf16/fp16)
        scale = (scb.float() / 127.0).to(dtype).unsqueeze(1)
        if torch.compiler.is_compiling():
            return torch.mul(cb, scale)
        return torch.mul(cb, scale, out=_buffer(cb.shape, dtype, cb.device))
    return weight.to(dtype)


class FusedLoRA(torch.autograd.Function):
    """Y_i = X·W_iᵀ (+ bias_i) + s_i·(X·A_iᵀ)·B_iᵀ for the projections i of one group.

    forward(X, bases, scales, A_0, B_0, A_1, B_1, ...) -> (Y_0, Y_1, ...), all in X's dtype;
    the LoRA weights may be of another dtype (fp32 on fp16 or CPU runs) and get their gradients
    in their own dtype. Saved for the backward: X and each X·A_iᵀ.
    """

    @staticmethod
    def forward(ctx, X, bases, scales, *lora):
        dtype = X.dtype
        x = X.reshape(-1, X.shape[-1])
        outs, xas = [], []
        for i, base in enumerate(bases):
            A, B = lora[2 * i].to(dtype), lora[2 * i + 1].to(dtype)
            W = dequantized_weight(base, dtype)
            y = x @ W.t()
            if base.bias is not None:
                y += base.bias.to(dtype)
            xa = x @ A.t()
            y.addmm_(xa, B.t(), alpha=scales[i])
            outs.append(y.reshape(*X.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.bases, ctx.scales = bases, scales
        ctx.save_for_backward(X, *xas, *lora)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        X, *rest = ctx.saved_tensors
        n = len(ctx.bases)
        xas, lora = rest[:n], rest[n:]
        dtype = X.dtype
        x = X.reshape(-1, X.shape[-1])
        dx = None
        lora_grads = []
        for i, base in enumerate(ctx.bases):
            A_param, B_param = lora[2 * i], lora[2 * i + 1]
            g = grads[i]
            if g is None:
                lora_grads += [None, None]
                continue
            g = g.reshape(-1, g.shape[-1]).to(dtype)
            A, B, s = A_param.to(dtype), B_param.to(dtype), ctx.scales[i]
            dB = (g.t() @ xas[i]).mul_(s)
            gb = g @ B  # N x r
            dA = (gb.t() @ x).mul_(s)
            lora_grads += [dA.to(A_param.dtype), dB.to(B_param.dtype)]
            if ctx.needs_input_grad[0]:
                W = dequantized_weight(base, dtype)
                if dx is None:
                    dx = g @ W
                else:
                    dx.addmm_(g, W)
                dx.addmm_(gb, A, alpha=s)
        dX = dx.reshape(X.shape) if dx is not None else None
        return (dX, None, None, *lora_grads)


class _Group:
    """Sibling LoRA layers that read one input; holds the outputs computed ahead of their calls."""

    def __init__(self, layers: list):
        self.layers = layers
        self.pending: dict[int, torch.Tensor] = {}
        self.pending_input: torch.Tensor | None = None


def _adapter(layer) -> str | None:
    """The one active vanilla LoRA adapter of `layer` without dropout, or None (PEFT's path then)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    return name


def _fused_forward(layer, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled() or _adapter(layer) is None:
        return layer._peft_forward(x, *args, **kwargs)
    group = layer._fused_group
    if group.pending_input is x and id(layer) in group.pending:
        out = group.pending.pop(id(layer))
        if not group.pending:
            group.pending_input = None
        return out
    siblings = [m for m in group.layers if m is layer or _adapter(m) is not None]
    if torch.is_autocast_enabled(x.device.type):  # the dtype autocast would give the matmuls
        x_in = x.to(torch.get_autocast_dtype(x.device.type))
    else:
        x_in = x
    lora, scales = [], []
    for m in siblings:
        name = _adapter(m)
        lora += [m.lora_A[name].weight, m.lora_B[name].weight]
        scales.append(float(m.scaling[name]))
    with torch.autocast(x.device.type, enabled=False):
        outs = FusedLoRA.apply(x_in, tuple(m.base_layer for m in siblings), tuple(scales), *lora)
    group.pending = {id(m): out for m, out in zip(siblings, outs) if m is not layer}
    group.pending_input = x if group.pending else None
    return outs[siblings.index(layer)]


def apply_fused_lora(model) -> int:
    """Patch every PEFT LoRA linear of `model` whose base layer is a bitsandbytes 4-bit or 8-bit
    linear or a plain nn.Linear and whose LoRA dropout is 0; returns how many were patched (0 with
    dropout > 0: PEFT's path keeps the dropout). Idempotent."""
    from peft.tuners.lora.layer import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            continue
        if _kind(module.get_base_layer()) is None or _adapter(module) is None:
            continue
        if not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        layers[name] = module
    grouped = set()
    for name, module in layers.items():
        parent, _, leaf = name.rpartition(".")
        members = next(([f"{parent}.{m}" for m in g] for g in GROUPS if leaf in g), [name])
        members = [m for m in members if m in layers]
        if name in grouped:
            continue
        group = _Group([layers[m] for m in members])
        for m in members:
            layers[m]._fused_group = group
            grouped.add(m)
    return len(layers)


def remove_fused_lora(model) -> None:
    """Undo `apply_fused_lora`: every patched layer runs PEFT's forward again."""
    for module in model.modules():
        if hasattr(module, "_peft_forward"):
            module.forward = module._peft_forward
            del module._peft_forward, module._fused_group
