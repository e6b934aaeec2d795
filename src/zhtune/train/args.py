"""A training command's typed config, and the Hugging Face ``TrainingArguments`` it becomes.

* :class:`TrainingConfig` is the base of every training command's config (``SftConfig``, ``PtConfig``):
  the sections are class annotations, :meth:`TrainingConfig.of` takes a dict, a plain Config or the typed
  config itself, and :meth:`TrainingConfig.from_cli` parses a command line.
* The pass-through set is declared here once (:func:`passthrough`): every TrainingArguments field that no
  section declares is accepted as it is (``--adam_beta2 0.95``, ``--fsdp "full_shard auto_wrap"``) and lands
  in ``TrainArgs.extra``. The command line, ``main(dict)``, the pipeline's recipe check and the recipe tests
  all use it.
* :func:`build_training_arguments` turns TrainArgs into TrainingArguments: the fields that mean the same
  are copied by name (:data:`COPIED`), the others are derived (precision, warm-up, evaluation, optimizer,
  logging), and :data:`ZHTUNE_ONLY` are zhtune's own, used before the Trainer is built.

transformers is imported inside the functions that need it, so importing a command module stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from zhtune.config.args import TrainArgs
from zhtune.config.parse import Config, build, parse_cli
from zhtune.errors import ConfigError

T = TypeVar("T", bound="TrainingConfig")

# TrainArgs fields that TrainingArguments takes with the same name and meaning
COPIED = (
    "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
    "lr_scheduler_type", "num_train_epochs", "max_steps", "max_grad_norm", "logging_steps", "save_steps",
    "save_total_limit", "fp16", "seed", "dataloader_num_workers", "deepspeed",
)  # fmt: skip
# TrainArgs fields that TrainingArguments gets in another form (see _derived)
DERIVED = (
    "per_device_eval_batch_size", "warmup_ratio", "warmup_steps", "eval_steps", "bf16", "optim", "report_to",
    "group_by_length", "nan_policy",
)  # fmt: skip
# TrainArgs fields zhtune acts on itself (model setup, resume, speed plan, guards); the Trainer never sees
# them, even where TrainingArguments has a field of that name (gradient_checkpointing, use_liger_kernel)
ZHTUNE_ONLY = (
    "overwrite_output_dir", "gradient_checkpointing", "gradient_checkpointing_offload", "resume_from_checkpoint", "padding_free", "packing",
    "use_liger_kernel", "chunked_loss", "compile_layers", "fused_lora", "fp8_base", "max_skipped_steps", "extra",
)  # fmt: skip


@functools.cache
def training_arguments_fields(cls: type | None = None) -> frozenset[str]:
    """Every field of ``cls``: transformers.TrainingArguments or a subclass of it (TRL's DPOConfig)."""
    if cls is None:
        from transformers import TrainingArguments as cls

    return frozenset(f.name for f in dataclasses.fields(cls))


def passthrough(sections: Mapping[str, type], arguments: type | None = None) -> dict[str, set[str]]:
    """The options a command accepts verbatim: the fields of ``arguments`` (default TrainingArguments) that no
    section declares, for its ``train`` section. A command without one passes nothing through."""
    if "train" not in sections:
        return {}
    own = {f.name for cls in sections.values() for f in dataclasses.fields(cls)}
    return {"train": set(training_arguments_fields(arguments)) - own}


class TrainingConfig(Config):
    """The config of a training command. Subclasses declare their sections as annotations, in the order
    ``--help`` and the saved config list them; a ``train`` section (TrainArgs) takes the pass-through."""

    @classmethod
    def arguments_class(cls) -> type:
        """The TrainingArguments class the trainer takes; a preference-tuning config returns TRL's."""
        from transformers import TrainingArguments

        return TrainingArguments

    def arguments(self) -> tuple[type, dict[str, Any]]:
        """This run's TrainingArguments class and the options the command sets on it beyond TrainArgs (a
        preference loss's class and its beta, say); pass-through options still win over them."""
        return self.arguments_class(), {}

    @classmethod
    def passthrough(cls) -> dict[str, set[str]]:
        """The options this command accepts verbatim (see :func:`passthrough`)."""
        return passthrough(cls.section_types(), cls.arguments_class())

    @classmethod
    def of(cls: type[T], cfg: Config | Mapping[str, Any]) -> T:
        """From a dict (flat or by section, as a recipe is), a Config with these sections, or itself."""
        if isinstance(cfg, cls):
            return cfg
        types = cls.section_types()
        if isinstance(cfg, Config):
            wrong = set(cfg.sections) != set(types) or any(
                not isinstance(cfg.sections[name], tp) for name, tp in types.items()
            )
            if wrong:
                raise ConfigError(
                    f"{cls.__name__} has sections {', '.join(types)}; this config has {', '.join(cfg.sections)}"
                )
            return cls({name: cfg.sections[name] for name in types}, source=cfg.source)
        return build(types, cfg, passthrough=cls.passthrough(), into=cls)

    @classmethod
    def from_cli(cls: type[T], argv: Sequence[str] | None, prog: str, description: str) -> T:
        """Parse ``[recipe.yaml] --option value ...`` (``--help`` and ``--print_config`` exit)."""
        types = cls.section_types()
        return parse_cli(
            argv, types, prog=prog, description=description, passthrough=cls.passthrough(), into=cls
        )


def build_training_arguments(
    t: TrainArgs,
    *,
    has_eval: bool,
    device: str,
    cls: type | None = None,
    own: Mapping[str, Any] | None = None,
) -> Any:
    """The TrainingArguments (or ``cls``, a subclass) of a run; ``own`` are the command's options for ``cls``
    (see :meth:`TrainingConfig.arguments`); pass-through options (``t.extra``) win over both."""
    if cls is None:
        from transformers import TrainingArguments as cls
    if t.fp16 and device == "cpu":
        raise ConfigError("--fp16 needs a GPU; on CPU train in float32 (the default) or --bf16")
    check_deepspeed(t.deepspeed)
    unknown = set(t.extra) - training_arguments_fields(cls)
    if unknown:
        raise ConfigError(f"unknown training options: {', '.join(sorted(unknown))}")
    kw = {name: getattr(t, name) for name in COPIED}
    kw.update(_derived(t, has_eval=has_eval, device=device))
    kw.update(own or {})
    kw.update(t.extra)
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid training options: {e}") from None


def _derived(t: TrainArgs, *, has_eval: bool, device: str) -> dict[str, Any]:
    bf16 = t.bf16
    if bf16 is None:
        import torch

        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported() and not t.fp16
    return dict(
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,  # below 1: a ratio
        save_strategy="steps",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        bf16=bool(bf16),
        data_seed=t.seed,
        optim=resolve_optim(t.optim, device),
        report_to=t.report_to or "none",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        # the NaN filter reads the loss every step, a GPU sync that stalls the queue; train.guard records the
        # first NaN/inf on the device instead. --nan_policy skip syncs every step anyway, so it filters the log
        logging_nan_inf_filter=t.nan_policy == "skip",
        disable_tqdm=False,
        use_cpu=(device == "cpu"),
        # zhtune applies these itself (prepare_for_training, the speed plan); said explicitly because TRL's
        # argument classes default gradient checkpointing to on
        gradient_checkpointing=False,
        use_liger_kernel=False,
    )


def check_deepspeed(path: str | None) -> None:
    """--deepspeed: the JSON must exist and parse, and deepspeed must be installed (it is not a dependency)."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"--deepspeed {path}: no such file (configs/deepspeed/ in the zhtune repository has "
            "ds_zero2_no_offload.json, ds_zero3.json and ds_zero3_offload.json)"
        )
    try:
        json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    from zhtune.deps import require

    require("deepspeed", "--deepspeed")


def resolve_optim(optim: str, device: str) -> str:
    """auto: fused AdamW on a GPU (one kernel for all parameters), the plain one elsewhere."""
    if optim != "auto":
        return optim
    return "adamw_torch_fused" if device.startswith("cuda") else "adamw_torch"
