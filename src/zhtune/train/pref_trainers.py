"""TRL's preference and RL trainers, taking zhtune's encoded data and its checkpoint seam. Nothing else changes.

Each class is ``class ZhX(CheckpointMixin, TRL's X)`` with the least that joins them:

* the data: zhtune encodes prompts and replies itself (:mod:`zhtune.train.pref_data`, the SFT segment encoder,
  so only reply tokens and their end-of-turn token carry the loss), and each trainer's own tokenization is
  passed over: DPOTrainer and KTOTrainer through ``_prepare_dataset`` (KTO's mismatched ``KL_completion_ids``
  are built exactly as TRL builds them), CPOTrainer and ORPOTrainer through ``tokenize_row``, GRPOTrainer
  through ``_tokenize_prompts`` (prompts are token ids rendered by zhtune's template);
* the reference of a LoRA run: handed a PeftModel, TRL copies its adapter into a frozen adapter named "ref"
  and scores the reference with it. For a fresh adapter (LoRA B = 0) that copy equals the base, so it is
  deleted and TRL scores the reference with the adapter disabled: one model in memory, no copy. A continued
  adapter (an SFT adapter given with ``--peft_path``) keeps its copy, since the reference is then the SFT
  model; it costs one adapter's weights, never a second model;
* the outputs: only the trained adapter ("default") is written, so a checkpoint or the final directory is
  what plain ``PeftModel.from_pretrained`` loads, and atomic, pickle-free checkpoints, resume and the NaN
  guard come from :class:`zhtune.train.trainer.CheckpointMixin`.

Importing this module needs TRL (``pip install 'zhtune[align]'``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from zhtune.deps import require
from zhtune.errors import ConfigError
from zhtune.train.trainer import CheckpointMixin

require("trl", "preference tuning (zhtune dpo, zhtune grpo)")

from trl import DPOTrainer, GRPOTrainer, KTOTrainer  # noqa: E402

with warnings.catch_warnings():  # trl.experimental announces itself on import; CPO and ORPO live there
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

log = logging.getLogger(__name__)
TRAINED = "default"  # peft's name of the adapter being trained
REF = "ref"  # TRL's name of its frozen copy

COLUMNS = {
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "kto": ("prompt_ids", "completion_ids", "label"),
    "cpo": ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
}


def check_columns(dataset: Any, layout: str, trainer: str) -> None:
    names = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
    missing = [c for c in COLUMNS[layout] if c not in names]
    if missing:
        raise ConfigError(
            f"{trainer} takes zhtune's encoded {layout} columns; this dataset lacks {', '.join(missing)} "
            "(build it with zhtune.train.pref_data.build_preference_data)"
        )


def drop_reference_copy(model: Any, fresh_adapter: bool) -> bool:
    """Delete TRL's "ref" adapter copy when the trained adapter is fresh; returns whether it was deleted."""
    config = getattr(model, "peft_config", None)
    if not fresh_adapter or not config or REF not in config:
        return False
    model.delete_adapter(REF)
    model.set_adapter(TRAINED)  # peft sets it active again, trainable
    log.debug("deleted TRL's reference copy of a fresh adapter: the reference is the adapter disabled")
    return True


class _RefSeam(CheckpointMixin):
    """The checkpoint seam plus the reference rule above; takes ``fresh_adapter=`` (a new LoRA adapter)."""

    saved_adapters = (TRAINED,)

    def __init__(self, *args: Any, fresh_adapter: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dropped_reference_copy = drop_reference_copy(self.model, fresh_adapter)


class ZhDPOTrainer(_RefSeam, DPOTrainer):
    """TRL's DPOTrainer (losses sigmoid = DPO, ipo, ...) on zhtune's ``dpo`` columns."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001
        check_columns(dataset, "dpo", type(self).__name__)
        return dataset


class ZhKTOTrainer(_RefSeam, KTOTrainer):
    """TRL's KTOTrainer on zhtune's ``kto`` columns. The KL term's mismatched completions are TRL's: each
    batch's completions rotated by one (so the data must be read in order: the sampler is sequential)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001
        check_columns(dataset, "kto", type(self).__name__)
        if self.calculate_KL and "KL_completion_ids" not in dataset.column_names:

            def rotate(batch: dict[str, list]) -> dict[str, list]:
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            dataset = dataset.map(
                rotate, batched=True, batch_size=args.per_device_train_batch_size, desc="KL completions"
            )
        return dataset


def _no_tokenize(self: Any, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
    check_columns(feature, "cpo", type(self).__name__)
    return feature  # zhtune's cpo columns: full sequences with labels -100 over the prompt


class ZhCPOTrainer(CheckpointMixin, CPOTrainer):
    """TRL's CPOTrainer (loss simpo: SimPO, reference-free) on zhtune's ``cpo`` columns."""

    tokenize_row = _no_tokenize
    saved_adapters = (TRAINED,)


class ZhORPOTrainer(CheckpointMixin, ORPOTrainer):
    """TRL's ORPOTrainer (reference-free) on zhtune's ``cpo`` columns."""

    tokenize_row = _no_tokenize
    saved_adapters = (TRAINED,)


class ZhGRPOTrainer(_RefSeam, GRPOTrainer):
    """TRL's GRPOTrainer whose dataset's ``prompt`` column holds token ids (zhtune's template and encoder)."""

    def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict]:
        if prompts and isinstance(prompts[0], list) and all(isinstance(x, int) for x in prompts[0]):
            return [list(p) for p in prompts], None, {}
        return super()._tokenize_prompts(prompts)


# the trainer of each preference loss (its columns: pref_data.LOSS_LAYOUT)
TRAINERS = {
    "dpo": ZhDPOTrainer, "ipo": ZhDPOTrainer, "kto": ZhKTOTrainer, "orpo": ZhORPOTrainer, "simpo": ZhCPOTrainer,
}  # fmt: skip
