"""FP8 for the frozen base of LoRA training (``--fp8_base true``).

Each frozen base projection under a LoRA adapter is replaced by ``FP8Linear``: its weight is kept in
float8 e4m3 with one float32 scale per output row (the row's largest magnitude over 448, e4m3's largest
value), and its GEMMs run on the FP8 tensor cores through ``torch._scaled_mm`` with row-wise scales:

    forward    x̂ = q(x) (one scale per token)             y = (x̂ Ŵᵀ) · sₓ sᵂ
    backward   ĝ = q(dy · sᵂ) (one scale per token)       dx = (ĝ Ŵ) · s_g

W gets no gradient. The adapter (peft's lora_A / lora_B) stays in its own dtype and computes as before, with
fused LoRA (train.fused_lora) or peft's forward, so the saved adapter is unchanged and loads in plain peft
on the original base. Memory: the base weight takes one byte per parameter instead of two. Accuracy: e4m3
has three mantissa bits; with per-row and per-token scales the rounding averages out over the GEMM's sum, and
bench/train_speed.py records the loss curve beside the bf16 one. Needs a GPU with FP8 tensor cores (compute
capability 8.9: Ada, Hopper and later); the same arithmetic runs on the CPU, where torch implements
``_scaled_mm`` too, for the tests. Not for QLoRA (the base is already 4-bit) or full fine-tuning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value


def quantize_rows(
    t: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (rows x cols) as e4m3 with one float32 scale per row (rows x 1): t ≈ q · scale. The scale is
    rounded to ``scale_dtype`` (t's dtype by default) before dividing, so the division runs in t's dtype
    without an fp32 copy of t, and the float32 scale returned is exactly the one divided by."""
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True)
    scale = (amax.float() / E4M3_MAX).clamp_min(1e-12).to(scale_dtype or t.dtype)
    q = (t / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.float()


def scaled_mm(a: torch.Tensor, sa: torch.Tensor, b_t: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype):
    """``(a · sa) @ (b_t · sb)ᵀ`` for e4m3 ``a`` (m x k, row-major) and ``b_t`` (n x k, row-major), scales
    sa (m x 1) and sb (n,), in ``dtype``. On CUDA, rows of ``a`` are padded to a multiple of 16."""
    m = a.shape[0]
    pad = (-m) % 16 if a.is_cuda else 0
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        sa = torch.cat([sa, sa.new_ones(pad, 1)])
    y = torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb.view(1, -1), out_dtype=dtype)
    return y[:m] if pad else y


class FP8Weight:
    """A frozen weight (out x in) in e4m3 with one float32 scale per output row."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data, self.scale = data, scale

    @classmethod
    def of(cls, weight: torch.Tensor) -> FP8Weight:
        q, s = quantize_rows(weight.detach().float())
        return cls(q, s.view(-1))

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.to(torch.float32) * self.scale[:, None]).to(dtype)

    def matmul(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x2 (tokens x in) @ Wᵀ in ``dtype``."""
        q, s = quantize_rows(x2.to(dtype))
        return scaled_mm(q, s, self.data, self.scale, dtype)

    def matmul_t(self, dy2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dy2 (tokens x out) @ W in ``dtype``: W's row scales folded into dy, then e4m3 against Ŵ."""
        g = dy2.to(dtype) * self.scale.to(dtype)
        q, s = quantize_rows(g)
        ones = self.scale.new_ones(self.data.shape[1])
        return scaled_mm(q, s, self.data.t().contiguous(), ones, dtype)


class FP8Matmul(torch.autograd.Function):
    """``x Wᵀ`` for an FP8Weight W: the gradient for x only."""

    @staticmethod
    def forward(ctx, x, w: FP8Weight, dtype: torch.dtype):  # noqa: ANN001
        ctx.w, ctx.dtype, ctx.x_meta = w, dtype, (x.shape, x.dtype)
        y = w.matmul(x.reshape(-1, x.shape[-1]), dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001
        if not ctx.needs_input_grad[0]:
            return None, None, None
        shape, xdt = ctx.x_meta
        dx = ctx.w.matmul_t(dy.reshape(-1, dy.shape[-1]), ctx.dtype)
        return dx.view(shape).to(xdt), None, None


class FP8Linear(torch.nn.Module):
    """A frozen ``nn.Linear`` whose weight is kept and multiplied in FP8 (see the module's docstring).
    ``weight`` is the e4m3 tensor (so ``.device`` and ``.shape`` answer as for a Linear) and ``weight_scale``
    its row scales; neither is in the state dict (the checkpoint of a LoRA run is its adapter)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        fp8 = FP8Weight.of(linear.weight)
        self.compute_dtype = linear.weight.dtype
        self.register_buffer("weight", fp8.data, persistent=False)
        self.register_buffer("weight_scale", fp8.scale, persistent=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def fp8(self) -> FP8Weight:
        """The weight with its scales, as the buffers are now (wherever .to() moved them)."""
        return FP8Weight(self.weight, self.weight_scale)

    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        kind = x.device.type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype_for(x)
        y = FP8Matmul.apply(x, self.fp8, dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-scaled"


def fp8_support(device: torch.device | str) -> str | None:
    """None when FP8 GEMMs run on ``device``, else why not."""
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no FP8 matmul"
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(dev)
            return (
                f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores; they need 8.9 or later"
            )
    return None


def convert(model: torch.nn.Module) -> int:
    """Replace the frozen base ``nn.Linear`` of every LoRA layer of ``model`` by an FP8Linear; returns how
    many were converted. Layers whose sizes are not multiples of 16 (a tensor-core requirement) are kept."""
    n = 0
    for mod in model.modules():
        base = getattr(mod, "base_layer", None)
        if not hasattr(mod, "lora_A") or type(base) is not torch.nn.Linear:
            continue
        w = base.weight
        if w.requires_grad or not w.is_floating_point() or w.shape[0] % 16 or w.shape[1] % 16:
            continue
        mod.base_layer = FP8Linear(base)
        n += 1
    return n


def convert_for_training(model: Any, sharded: bool, device: str) -> int:
    """--fp8_base true: convert, or a ConfigError saying why this model or device cannot."""
    from zhtune.errors import ConfigError

    if sharded:
        raise ConfigError("--fp8_base true cannot be combined with --fsdp/--deepspeed (sharded weights)")
    why = fp8_support(device)
    if why:
        raise ConfigError(f"--fp8_base true: {why}")
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        raise ConfigError(
            "--fp8_base true is for a bf16/fp16 base: this one is quantized (--load_in_4bit/8bit)"
        )
    n = convert(model)
    if not n:
        raise ConfigError("--fp8_base true: no LoRA layer with a frozen linear base to convert (LoRA only)")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log.info("FP8 base: %d projections in e4m3", n)
    return n
