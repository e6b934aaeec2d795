"""The UTF-8 guard of :mod:`zhtune.infer.utf8` in transformers' continuous batching.

Continuous batching runs one packed row of every request's new tokens through the model and hands a plain
logits processor only the newest token of each request, not the last three the guard reads. Its per-request
processors (:class:`ContinuousBatchingLogitsProcessor`) get one integer per request instead, prepared on the
host before each step: :class:`ContinuousUtf8Guard` puts there each request's UTF-8 decoder state after its
last three tokens (prompt and reply so far, as :meth:`Utf8Guard.state` reads them), and masks on the device
with the guard's tables. It goes first among the processors, so temperature, top-k and top-p (greedy is
top-k 1) choose among the tokens that keep the reply valid, as ``generate`` with the guard does.

The host knows each request's newest token only when batches are prepared one after the other. With
transformers' asynchronous batching (the next batch prepared while the GPU computes this one, its default
with CUDA graphs) it does not, so :func:`install` leaves the guard out there and says so; the detokenizer
still holds an unfinished last character back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from zhtune.infer.utf8 import GROUND, Utf8Guard

log = logging.getLogger(__name__)


class ContinuousUtf8Guard(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, guard: Utf8Guard):
        self.guard = guard

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GROUND)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        states = [
            self.guard.host_state(f.state.initial_tokens, f.state.generated_tokens)
            for f in requests_with_new_token
        ]
        return torch.tensor(states, dtype=torch.int32)

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        return self.guard.mask(scores, tensor_arg[: scores.size(0)].long())


def install(manager: Any, guard: Utf8Guard | None) -> bool:
    """Put the guard first among a (not yet started) continuous batching manager's logits processors."""
    if guard is None:
        return False
    if manager.continuous_batching_config.use_async_batching:
        log.info(
            "continuous batching prepares batches ahead (asynchronous batching): tokens that would break a "
            "UTF-8 character are not masked; an unfinished last character is still held back"
        )
        return False
    procs = manager.logit_processor
    procs.logits_processor.insert(0, ContinuousUtf8Guard(guard))
    procs.tensors_required += 1  # one int32 per request: its decoder state
    procs.do_processing = True
    return True
