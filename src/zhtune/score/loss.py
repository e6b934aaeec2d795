"""Causal-LM loss from hidden states, a chunk of tokens at a time, never holding full-vocabulary logits.

The usual path materialises logits for every token (tokens x vocabulary), prompt tokens included, upcasts
them to fp32 and keeps them for backward: 2 GiB for 16k tokens at a 32k vocabulary, 3 GiB after a Chinese vocabulary extension.
Here the output projection, log-softmax and its gradient run chunk by chunk inside one autograd function,
as fused linear cross-entropy kernels do: the gradients with respect to the hidden states and the head
weight are computed during the forward pass and only scaled in backward, so no chunk is recomputed and the
peak is one chunk's logits. Only positions with a label go through the head at all. Arithmetic matches the usual path: the projection runs in the autocast dtype
(bf16 under mixed precision), the softmax in fp32.

When Liger kernels are in use their fused linear cross-entropy does this job (see train.speed).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch

IGNORE = -100
CHUNK_BYTES = 256 * 2**20  # fp32 logits held at once


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(64, chunk_bytes // (4 * vocab) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, denom, chunk, compute_dtype):  # noqa: ANN001
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, h.shape[0], chunk):
                hc, tc = h[s : s + chunk], targets[s : s + chunk]
                valid = tc != IGNORE
                safe = torch.where(valid, tc, 0)
                logits = (hc @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                total += torch.where(valid, lse - picked, 0.0).sum()
                if want_h or want_w:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    rows = torch.arange(probs.shape[0], device=probs.device)
                    probs[rows, safe] -= valid.to(probs.dtype)
                    probs.mul_(valid[:, None].to(probs.dtype))
                    g = probs.to(compute_dtype)
                    if want_h:
                        grad_h[s : s + chunk] = g @ w
                    if want_w:
                        grad_w += (g.t() @ hc).float()
            loss = total / denom
        ctx.denom = denom
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.have = (want_h, want_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.denom
        gh = (grad_h * scale).to(ctx.dtypes[0]) if ctx.have[0] else None
        gw = (grad_w * scale).to(ctx.dtypes[1]) if ctx.have[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` shifted by one, as transformers'
    ForCausalLMLoss computes it (mean over labelled tokens, or sum / num_items_in_batch when given)."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    valid = targets != IGNORE
    n_valid = int(valid.sum().item())
    if n_valid < targets.numel():
        # only labelled positions go through the head: in SFT most tokens are the prompt's, and their
        # logits (a vocabulary-wide softmax each) would be computed only to be thrown away
        keep = valid.nonzero().squeeze(1)
        h, targets = h.index_select(0, keep), targets.index_select(0, keep)
    if num_items_in_batch is None:
        denom = n_valid
    else:
        denom = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    dev = h.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    if compute_dtype != h.dtype and not torch.is_autocast_enabled(dev):
        compute_dtype = h.dtype
    return _LinearCrossEntropy.apply(
        h, weight, targets, float(denom), chunk or chunk_rows(weight.shape[0]), compute_dtype
    )


def head_weight(model: Any) -> torch.Tensor | None:
    """The output projection's trained weight, or None when the head is not a plain bias-free linear layer
    (a LoRA-wrapped head, logit soft-capping or scaling): then the usual loss path is used."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            return None
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return None
    head = base.get_output_embeddings()
    inner = getattr(head, "modules_to_save", None)  # peft ModulesToSaveWrapper: the trained copy
    if inner is not None:
        names = getattr(head, "active_adapters", None) or list(inner.keys())
        head = inner[names[0]]
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight


@contextmanager
def capture_final_hidden(model: Any):
    """Within the block, ``box["hidden"]`` is the decoder's last hidden state (after the final norm)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    box: dict[str, torch.Tensor] = {}

    def hook(_mod, _args, out):  # noqa: ANN001
        box["hidden"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = base.get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
