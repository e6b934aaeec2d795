"""Fused LoRA: a projection and its adapter as one autograd function, installed on peft's own LoRA layers.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * s``: besides the GEMMs that is a full-size scale and a
full-size add in forward, and in backward a full-size scale of the output gradient and autograd's full-size sum
of the two input gradients (the frozen and the adapter path both read ``x``). Here the same arithmetic is

    forward    y = x Wᵀ (+ bias);  u = s · (x Aᵀ);  y += u Bᵀ          (the add is the GEMM's accumulate)
    backward   g = s · (dy B);  dx = dy W;  dx += g A;  dA = gᵀ x;  dB = dyᵀ u

so every full-size tensor is touched only by GEMMs; the element-wise work left is on ``tokens x rank`` tensors.
W gets no gradient; dx is skipped when x needs none (the first layer without checkpointing).

Why not ``x @ [W; A]ᵀ`` as one GEMM: its output rows hold ``out + r`` columns, so y would be a strided view.
Liger's SwiGLU kernel indexes its inputs with the output's row stride and reads such a view wrongly, and making
y contiguous again costs the full-size copy this module removes. The second GEMM re-reads x instead (memory
bound, rank 8 wide). The backward's ``[dy, g] @ [W; A]`` would likewise need a copy of dy; ``dx += g A`` is the
GEMM's accumulate. This is the layout unsloth's ``matmul_lora`` uses.

LoRA dropout > 0: A reads ``dropout(x)``, W reads x, so the two input gradients are returned separately and
autograd adds them (after dropout's own backward); the dropout module is peft's own, so the masks are the
ones peft would draw. A 4-bit (bitsandbytes NF4/FP4) base is dequantized inside the function, in forward and
again in backward, as bitsandbytes itself does; the dequantized weight is never kept. An FP8 base
(train.fp8, ``--fp8_base``) multiplies in FP8 inside the function: its two GEMMs become scaled-mm calls.

Installation is per layer instance: ``fuse`` sets the ``forward`` attribute of each eligible peft
``lora.Linear`` / ``lora.Linear4bit`` to a ``FusedForward`` object, ``unfuse`` deletes it again; peft's classes
are untouched. Parameters stay peft's own ``lora_A`` / ``lora_B`` weights, so state dicts and saved adapters
are unchanged. Any call the fused path does not cover (adapters disabled or merged, several active adapters,
DoRA and other variants, extra arguments, dtypes that differ from what peft would compute in) goes to peft's
own forward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from zhtune.train.fp8 import FP8Linear, FP8Weight

log = logging.getLogger(__name__)


def is_4bit(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "Params4bit"


def weight_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the base weight computes in (a 4-bit weight: the dtype it was quantized from)."""
    if is_4bit(weight):
        state = getattr(weight, "quant_state", None)
        return None if state is None else state.dtype
    return weight.dtype


def base_dtype(base: torch.nn.Module) -> torch.dtype | None:
    """The dtype a LoRA layer's base computes in (FP8 or 4-bit: the dtype it was quantized from)."""
    return base.compute_dtype if isinstance(base, FP8Linear) else weight_dtype(base.weight)


def base_weight(base: torch.nn.Module) -> torch.Tensor | FP8Weight:
    """What LoRAMatmul multiplies by: the base's weight, or its FP8Weight."""
    return base.fp8 if isinstance(base, FP8Linear) else base.weight


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense ``out x in`` matrix in ``dtype`` (a 4-bit weight is dequantized)."""
    if is_4bit(weight):
        from peft.utils.integrations import dequantize_bnb_weight

        weight = dequantize_bnb_weight(weight)
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoRAMatmul(torch.autograd.Function):
    """``x Wᵀ + b + s · (x' Aᵀ) Bᵀ`` with x' = x (``x_lora`` None) or dropout(x); gradients for x, x', A, B."""

    @staticmethod
    def forward(ctx, x, x_lora, a, b, weight, bias, scaling: float, dtype: torch.dtype):  # noqa: ANN001
        k = x.shape[-1]
        x2 = x.reshape(-1, k).to(dtype)
        if isinstance(weight, FP8Weight):
            y = weight.matmul(x2, dtype)
            if bias is not None:
                y.add_(bias.to(dtype))
        else:
            w = dense_weight(weight, dtype)
            y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            del w
        ac, bc = a.to(dtype), b.to(dtype)
        src = x2 if x_lora is None else x_lora.reshape(-1, k).to(dtype)
        u = torch.mm(src, ac.t()).mul_(scaling)  # tokens x rank
        y.addmm_(u, bc.t())
        ctx.save_for_backward(src, u, ac, bc)
        ctx.weight, ctx.dtype, ctx.scaling = weight, dtype, scaling
        ctx.x_meta = (x.shape, x.dtype)
        ctx.xl_meta = None if x_lora is None else (x_lora.shape, x_lora.dtype)
        ctx.param_dtypes = (a.dtype, b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        src, u, ac, bc = ctx.saved_tensors
        need_x, need_xl, need_a, need_b = ctx.needs_input_grad[:4]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype)
        dx = dxl = da = db = None
        if need_b:
            db = torch.mm(dy2.t(), u).to(ctx.param_dtypes[1])
        g = torch.mm(dy2, bc).mul_(ctx.scaling) if (need_x or need_xl or need_a) else None
        if need_a:
            da = torch.mm(g.t(), src).to(ctx.param_dtypes[0])
        if need_x:
            w = ctx.weight
            dx = (
                w.matmul_t(dy2, ctx.dtype)
                if isinstance(w, FP8Weight)
                else torch.mm(dy2, dense_weight(w, ctx.dtype))
            )
            if ctx.xl_meta is None:
                dx.addmm_(g, ac)
            shape, dtype = ctx.x_meta
            dx = dx.view(shape).to(dtype)
        if need_xl:
            shape, dtype = ctx.xl_meta
            dxl = torch.mm(g, ac).view(shape).to(dtype)
        return dx, dxl, da, db, None, None, None, None


def lora_layer_classes() -> tuple[type, ...]:
    """peft's dense and (when bitsandbytes is installed) 4-bit LoRA linear layers."""
    from peft.tuners.lora.layer import Linear

    classes: list[type] = [Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        if hasattr(lora_bnb, "Linear4bit"):
            classes.append(lora_bnb.Linear4bit)
    except ImportError:  # bitsandbytes missing or broken: no 4-bit layers can exist either
        pass
    return tuple(classes)


def active_adapter(layer: Any) -> str | None:
    """The one plain LoRA adapter this layer applies now, or None when the call must go to peft."""
    if layer.disable_adapters or layer.merged:
        return None
    names = layer.active_adapters
    if len(names) != 1:
        return None
    name = names[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    return name


def compute_dtype(layer: Any, name: str, x: torch.Tensor) -> torch.dtype | None:
    """The dtype peft's forward would compute this call in, or None where the fused path would differ."""
    base = layer.base_layer
    w = base.weight
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad) or x.device != w.device:
        return None
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    wdt = base_dtype(base)
    if wdt is None:
        return None
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    if getattr(base, "compute_dtype", None) not in (None, x.dtype):
        return None  # bitsandbytes would cast x to its compute dtype and back: left to peft
    a = layer.lora_A[name].weight
    return x.dtype if wdt == x.dtype == a.dtype == layer.lora_B[name].weight.dtype else None


class FusedForward:
    """The ``forward`` of one peft LoRA layer instance: LoRAMatmul where it applies, else peft's own forward.
    A plain object (not a bound method), so ``copy.deepcopy`` of the model rebinds it to the copied layer."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        name = None if (args or kwargs) else active_adapter(layer)
        dtype = compute_dtype(layer, name, x) if name is not None else None
        if dtype is None:
            return type(layer).forward(layer, x, *args, **kwargs)
        drop = layer.lora_dropout[name]
        x_lora = drop(x) if drop.training and getattr(drop, "p", 0.0) > 0 else None
        base = layer.base_layer
        return LoRAMatmul.apply(
            x,
            x_lora,
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            base_weight(base),
            base.bias,
            float(layer.scaling[name]),
            dtype,
        )


def eligible(module: torch.nn.Module, classes: tuple[type, ...]) -> bool:
    if not isinstance(module, classes) or "forward" in module.__dict__:
        return False  # another wrapper (accelerate's hooks) already owns this instance's forward
    base = module.base_layer
    if getattr(module, "fan_in_fan_out", False) or module.lora_variant or "forward" in base.__dict__:
        return False
    if isinstance(base, FP8Linear):
        return True
    w = getattr(base, "weight", None)
    return isinstance(base, torch.nn.Linear) and w is not None and (w.is_floating_point() or is_4bit(w))


def fuse(model: torch.nn.Module) -> int:
    """Install FusedForward on every eligible LoRA layer of ``model``; returns how many layers are fused now
    (those fused by an earlier call included)."""
    classes = lora_layer_classes()
    for mod in model.modules():
        if eligible(mod, classes):
            mod.forward = FusedForward(mod)
    return len(fused_layers(model))


def unfuse(model: torch.nn.Module) -> int:
    """Give every fused layer back its class's forward; returns how many were restored."""
    n = 0
    for mod in model.modules():
        if isinstance(mod.__dict__.get("forward"), FusedForward):
            del mod.forward
            n += 1
    return n


def fused_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), FusedForward)]


def check_layer(layer: torch.nn.Module, dtype: torch.dtype | None, tokens: int = 16) -> str | None:
    """LoRAMatmul against the base layer's own forward plus peft's LoRA arithmetic, with random adapter weights
    (a fresh B is zero, which would hide the adapter path) and a random input, under ``dtype`` autocast (None:
    none). Returns how output and gradients differ when they differ by more than rounding, else None."""
    base = layer.base_layer
    dev = base.weight.device
    name = next(iter(layer.lora_A))
    a0, b0 = layer.lora_A[name].weight, layer.lora_B[name].weight
    if dtype is None and base_dtype(base) != a0.dtype:
        return None  # compute_dtype sends every such call to peft: nothing fused to check
    (r, k), xdt = a0.shape, (dtype or a0.dtype)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int, dt: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, device=dev) * scale
        return t.to(dt).requires_grad_()

    x = rand(2, tokens // 2, k, dt=xdt)
    a, b = rand(r, k, dt=a0.dtype, scale=k**-0.5), rand(b0.shape[0], r, dt=b0.dtype, scale=r**-0.5)
    s = 2.0
    with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        ref = base(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * s
        cd = dtype or x.dtype
        out = LoRAMatmul.apply(x, None, a, b, base_weight(base), base.bias, s, cd)
    dy = torch.randn(ref.shape, generator=g, device=dev).to(ref.dtype)
    want = (ref, *torch.autograd.grad(ref, (x, a, b), dy))
    got = (out, *torch.autograd.grad(out, (x, a, b), dy))
    tol = 1e-4 if cd == torch.float32 else 3e-2
    for what, w_, g_ in zip(("output", "dx", "dA", "dB"), want, got):
        err = ((g_.float() - w_.float()).norm() / w_.float().norm().clamp_min(1e-12)).item()
        if not err <= tol:
            return f"{what} differs from peft's by {err:.2e} (relative; tolerance {tol:.0e})"
    return None


def self_check(model: torch.nn.Module, dtype: torch.dtype | None) -> str | None:
    """check_layer on one fused layer of each kind (dense, 4-bit); what differs, or None."""
    seen: set[str] = set()
    for layer in fused_layers(model):
        base = layer.base_layer
        kind = "FP8" if isinstance(base, FP8Linear) else "4-bit" if is_4bit(base.weight) else "dense"
        if kind not in seen:
            seen.add(kind)
            why = check_layer(layer, dtype)
            if why:
                return f"{kind} LoRA layer: {why}"
    return None
