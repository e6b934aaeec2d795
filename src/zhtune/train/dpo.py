"""``zhtune dpo``: preference tuning after SFT with TRL's trainers: ``--loss dpo|ipo|orpo|simpo|kto``.

Pairs of a prompt with a chosen and a rejected reply (LLaMA-Factory, ShareGPT, OpenAI messages,
prompt/chosen/rejected; KTO also takes labelled single replies) from ``--train_files`` / ``--dataset_dir``,
encoded by SFT's exact-boundary encoder (:mod:`zhtune.train.pref_data`), so only reply tokens and their
end-of-turn token carry the loss. The loss is TRL's (:mod:`zhtune.train.pref_trainers`):

* ``dpo`` (DPOTrainer, sigmoid loss), ``ipo`` (DPOTrainer, IPO), ``kto`` (KTOTrainer): against a reference.
  With LoRA the reference is the model with its adapter disabled, or, continuing an SFT adapter
  (``--peft_path``), a frozen copy of that adapter: never a second model. With ``--finetuning_type full`` a
  second copy of the model is loaded, unless ``--precompute_ref_log_probs`` scores the data once before
  training instead;
* ``orpo`` (ORPOTrainer) and ``simpo`` (CPOTrainer with loss simpo): reference-free, nothing extra.

It starts from an SFT adapter (``--peft_path``, continued; its tokenizer and chat template are used) or a
merged SFT model (``--model_name_or_path``). Outputs as ``zhtune sft``'s: an adapter plain peft loads (or the
model), tokenizer and template, the resolved config, loss_curve.png, TensorBoard logs, train_results.json.
Each log line carries TRL's metrics: loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (KTO: no accuracy, it has no pairs). TRL's own defaults that differ (learning rate 1e-6,
bf16 forced on, gradient checkpointing always on) give way to zhtune's, as in SFT.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.args import DataArgs, LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import Config, field
from zhtune.errors import ConfigError
from zhtune.train.args import TrainingConfig, training_arguments_fields

log = logging.getLogger(__name__)
DESCRIPTION = (
    "Preference-tune a model after SFT: DPO, IPO, ORPO, SimPO or KTO (TRL's trainers; LoRA or full)."
)

LOSSES = ("dpo", "ipo", "orpo", "simpo", "kto")
REFERENCED = ("dpo", "ipo", "kto")  # the losses that compare with a reference model
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
SET_BY_LOSS = {"loss_type", "max_length"}  # TRL options zhtune sets from --loss and --max_seq_length


@dataclass
class PrefArgs:
    """preference tuning"""

    loss: Literal["dpo", "ipo", "orpo", "simpo", "kto"] = field(
        "dpo",
        "dpo (sigmoid loss, against a reference), ipo (squared loss on length-averaged log-ratios), orpo "
        "(SFT loss plus an odds-ratio term, no reference), simpo (length-averaged log-probabilities with a "
        "margin, no reference) or kto (desirable/undesirable single replies, against a reference).",
    )
    beta: float | None = field(
        None,
        "Strength of the preference term (DPO/KTO's beta, IPO's tau, ORPO's lambda, SimPO's beta). Default by "
        "loss: 0.1, and 2.0 for SimPO (its paper uses 2.0-2.5).",
    )
    label_smoothing: float = field(
        0.0,
        "dpo, simpo: assumed share of pairs labelled the wrong way round (conservative DPO), in [0, 0.5).",
    )
    simpo_gamma: float = field(0.5, "simpo: the target reward margin gamma.")
    cpo_alpha: float = field(
        0.0, "simpo: weight of an SFT loss on the chosen reply added to SimPO's (0: SimPO as published)."
    )
    desirable_weight: float = field(1.0, "kto: weight of the desirable replies' loss.")
    undesirable_weight: float = field(
        1.0, "kto: weight of the undesirable replies' loss (raise it when they are fewer)."
    )
    max_prompt_length: int | None = field(
        None,
        "Keep at most this many prompt tokens (the last ones, after any BOS token); replies then get the rest "
        "of --max_seq_length. Default: prompts are cut only when a reply would not fit.",
    )
    held_out_pairs: float = field(
        0,
        "Hold out this many pairs (a whole number) or this share (below 1), whole prompts at a time, drawn from "
        "--seed: written to <output_dir>/heldout_pairs.jsonl for zhtune eval --task_metric preference, and the "
        "rest (train_pairs.jsonl) is trained on.",
    )
    precompute_ref_log_probs: bool = field(
        False,
        "dpo, ipo, kto: score the data with the reference once before training and keep only the numbers, so "
        "full fine-tuning loads no second model.",
    )

    def __post_init__(self) -> None:
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise ConfigError(f"--label_smoothing goes with --loss dpo or simpo, not {self.loss}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("--desirable_weight and --undesirable_weight must be positive")
        if self.held_out_pairs < 0 or (
            self.held_out_pairs >= 1 and not float(self.held_out_pairs).is_integer()
        ):
            raise ConfigError(
                f"--held_out_pairs is a whole number or a share below 1, got {self.held_out_pairs}"
            )
        if self.precompute_ref_log_probs and self.loss not in REFERENCED:
            raise ConfigError(f"--precompute_ref_log_probs: --loss {self.loss} uses no reference model")

    @property
    def strength(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]


@dataclass
class DpoDataArgs(DataArgs):
    """preference data"""

    train_files: list[str] | None = field(
        None,
        "Preference files, comma separated: LLaMA-Factory/ShareGPT (conversations + chosen + rejected), "
        "messages + chosen/rejected, prompt/chosen/rejected, or KTO's labelled completions.",
    )


@dataclass
class DpoTrainArgs(TrainArgs):
    """how to train (Hugging Face Trainer flags)"""

    learning_rate: float = field(
        5e-5, "Peak learning rate (LoRA; full fine-tuning wants about 5e-7 to 1e-6, TRL's default)."
    )


def argument_classes() -> dict[str, type]:
    """TRL's TrainingArguments class of each loss."""
    import warnings

    from trl import DPOConfig, KTOConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.cpo import CPOConfig
        from trl.experimental.orpo import ORPOConfig
    return {"dpo": DPOConfig, "ipo": DPOConfig, "kto": KTOConfig, "orpo": ORPOConfig, "simpo": CPOConfig}


class DpoConfig(TrainingConfig):
    """zhtune dpo's configuration; ``DpoConfig.of(dict)`` builds one from a dict or a recipe's mapping."""

    model: ModelArgs
    data: DpoDataArgs
    lora: LoraArgs
    pref: PrefArgs
    train: DpoTrainArgs

    @classmethod
    def arguments_class(cls) -> type:
        from zhtune.deps import require

        require("trl", "zhtune dpo")
        return argument_classes()["dpo"]

    @classmethod
    def passthrough(cls) -> dict[str, set[str]]:
        """Any field of TRL's argument classes (for every loss) that no section declares; the class of the
        chosen loss then checks them (an option of another loss's class is refused when training starts)."""
        from zhtune.deps import require

        require("trl", "zhtune dpo")
        own = {f.name for sec in cls.section_types().values() for f in dataclasses.fields(sec)}
        fields = set().union(*(training_arguments_fields(c) for c in argument_classes().values()))
        return {"train": fields - own - SET_BY_LOSS}

    def arguments(self) -> tuple[type, dict[str, Any]]:
        p, d = self.pref, self.data
        kw: dict[str, Any] = {"beta": p.strength, "max_length": d.max_seq_length}
        if p.loss in ("dpo", "ipo"):
            kw.update(loss_type=["sigmoid" if p.loss == "dpo" else "ipo"], label_smoothing=p.label_smoothing)
        if p.loss in REFERENCED:
            kw["precompute_ref_log_probs"] = p.precompute_ref_log_probs
        if p.loss == "kto":  # the KL term pairs each batch's completions in dataset order
            kw.update(
                desirable_weight=p.desirable_weight,
                undesirable_weight=p.undesirable_weight,
                train_sampling_strategy="sequential",
            )
        if p.loss == "simpo":
            kw.update(
                loss_type="simpo",
                simpo_gamma=p.simpo_gamma,
                cpo_alpha=p.cpo_alpha,
                label_smoothing=p.label_smoothing,
            )
        return argument_classes()[p.loss], kw


CONFIG = DpoConfig
SECTIONS = DpoConfig.section_types()


def adapter_tokenizer(cfg: DpoConfig) -> None:
    """Continuing an SFT adapter: its tokenizer (vocabulary, chat template) is the one it was trained with."""
    peft_path, m = cfg.lora.peft_path, cfg.model
    if (
        peft_path
        and m.tokenizer_name_or_path is None
        and (Path(peft_path) / "tokenizer_config.json").is_file()
    ):
        m.tokenizer_name_or_path = peft_path


@dataclass
class PrefRun:
    """A preference run set up and ready to train: ``build`` returns it, ``main`` trains and saves it."""

    cfg: DpoConfig
    ctx: Any  # train.run.RunContext
    fmt: Any
    trainer: Any
    report: Any  # pref_data.PrefReport
    held_out: str | None
    eval_ds: Any


def build(cfg: DpoConfig | Config | dict[str, Any]) -> PrefRun:
    """Everything up to training: the prologue, the encoded pairs, the model and TRL's trainer."""
    from zhtune.train.launch import main_process_first
    from zhtune.train.pref_data import LOSS_LAYOUT, build_preference_data
    from zhtune.train.run import prologue, report_parameters, say

    cfg = DpoConfig.of(cfg)
    lo, p, t = cfg.lora, cfg.pref, cfg.train
    if p.loss == "kto" and t.per_device_train_batch_size < 2:
        raise ConfigError(
            "--loss kto needs --per_device_train_batch_size 2 or more (its KL term pairs replies)"
        )
    adapter_tokenizer(cfg)
    ctx = prologue(cfg)
    fmt = ctx.chat_format(cfg.data.template)
    layout = LOSS_LAYOUT[p.loss]
    log.info("chat template: %s; loss %s on TRL's %s columns", fmt.name, p.loss, layout)
    with main_process_first():
        d, held_out = hold_out(cfg, ctx.out)
        train_ds, eval_ds, report = build_preference_data(
            ctx.tokenizer, fmt, d, layout=layout, seed=t.seed, max_prompt_length=p.max_prompt_length
        )
    say(f"preference data ({'from cache' if report.cached else 'tokenized'}):\n{report.table()}")

    model, _ = ctx.load_model(full=lo.finetuning_type == "full")
    rows = 1 if layout == "kto" else 2  # a pair is two sequences
    model = ctx.prepare(model, lo, tokens_per_step=t.per_device_train_batch_size * rows * d.max_seq_length)
    report_parameters(model, "trainable parameters:")
    kw = reference(ctx, cfg)
    trainer = ctx.trainer(
        trainer_class(p.loss), model=model, train_dataset=train_ds, eval_dataset=eval_ds, **kw
    )
    return PrefRun(cfg, ctx, fmt, trainer, report, held_out, eval_ds)


def main(cfg: DpoConfig | Config | dict[str, Any]) -> dict[str, Any]:
    """Run preference tuning; returns a summary (metrics, data report, output paths)."""
    from zhtune.text.templates import attach

    run = build(cfg)
    metrics = run.ctx.fit(run.trainer, evaluate=run.eval_ds is not None)
    attach(run.fmt, run.ctx.tokenizer)
    summary = {
        "output_dir": str(run.ctx.out),
        "loss": run.cfg.pref.loss,
        "heldout_pairs": run.held_out,
        "metrics": metrics,
        "data": run.report.__dict__,
        "log_history": run.trainer.state.log_history,
        "template": run.fmt.name,
    }
    run.ctx.finish(run.trainer, run.fmt, summary)
    return summary


def hold_out(cfg: DpoConfig, out: Path) -> tuple[DpoDataArgs, str | None]:
    """--held_out_pairs: split the files into <out>/train_pairs.jsonl and heldout_pairs.jsonl (the same split
    for the same files and --seed) and train on the first; returns the data options and the held-out file."""
    from zhtune.text.preference import write_held_out_split
    from zhtune.text.records import list_data_files
    from zhtune.train.run import say

    d, n = cfg.data, cfg.pref.held_out_pairs
    if not n:
        return d, None
    paths = list_data_files(d.dataset_dir, d.train_files)
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train_pairs.jsonl", out / "heldout_pairs.jsonl"
    split = write_held_out_split(
        paths, train, held, held_out=n, seed=cfg.train.seed, skip_bad_records=d.skip_bad_records
    )
    say(f"held out {len(split.held_out)} of {len(split.train) + len(split.held_out)} records: {held}")
    return dataclasses.replace(d, train_files=[str(train)], dataset_dir=None), str(held)


def trainer_class(loss: str) -> type:
    from zhtune.train.pref_trainers import TRAINERS

    return TRAINERS[loss]


def reference(ctx: Any, cfg: DpoConfig) -> dict[str, Any]:
    """The trainer's reference arguments: none for ORPO/SimPO; a LoRA run scores it with the adapter disabled
    (fresh) or a frozen copy of the continued adapter; full fine-tuning loads a second copy, unless the
    reference log-probabilities are precomputed."""
    from zhtune.train.run import say

    p, lo = cfg.pref, cfg.lora
    if p.loss not in REFERENCED:
        return {}
    if lo.finetuning_type != "full":
        fresh = lo.peft_path is None
        say(f"reference: the model with its {'fresh adapter disabled' if fresh else 'SFT adapter, frozen'}")
        return {"fresh_adapter": fresh}
    if p.precompute_ref_log_probs:
        say("reference: log-probabilities precomputed with the model before training")
        return {}
    ref, _ = ctx.load_model(full=False)  # in --dtype: it is only read
    ref.requires_grad_(False).eval()
    say("reference: a second copy of the model (--precompute_ref_log_probs avoids it)")
    return {"ref_model": ref}


def cli(argv: list[str] | None = None) -> int:
    from zhtune.train.run import say

    summary = main(DpoConfig.from_cli(argv, "zhtune dpo", DESCRIPTION))
    last = next((h for h in reversed(summary["log_history"]) if "rewards/margins" in h), {})
    shown = {k: last[k] for k in ("loss", "rewards/margins", "rewards/accuracies") if k in last}
    parts = [f"{k} {v:.4f}" for k, v in shown.items()]
    say(
        f"done ({summary['loss']}): {', '.join(parts) or 'no step logged'}; outputs in {summary['output_dir']}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())


__all__ = ["main", "cli", "DpoConfig", "PrefArgs", "SECTIONS", "LOSSES"]
