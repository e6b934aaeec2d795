"""``zhtune grpo``: reinforcement learning with verifiable rewards, on TRL's GRPOTrainer.

Records are instruction records (Alpaca, ShareGPT or messages) whose last assistant turn is the reference the
reward compares with. The prompt is the conversation before it, rendered by zhtune's chat template and
encoder into token ids (exactly what ``zhtune chat`` and SFT use; TRL's own templating is passed over), and
generation stops at the template's end-of-turn token. For each prompt TRL samples ``--num_generations``
replies with transformers' ``generate`` (vLLM with ``--use_vllm true`` where it is installed), scores them and
moves the policy toward the better ones of the group.

Rewards need no reward model (:mod:`zhtune.train.rewards`): a record's own ``reward`` field (label, exact,
contains, f1, regex, length, format, python), else its ``task`` field looked up in ``--task_rewards``
(``{sentiment: label, ner: f1}``), else ``--reward``; ``--extra_rewards length,format`` adds rewards scored
on every record, and ``--reward_fn file.py:function`` is your own Python function (see the rewards module).

LoRA (a fresh adapter or a continued SFT adapter with ``--peft_path``) or full fine-tuning; the KL term is
off as in TRL (``--beta 0``); with ``--beta`` above 0 the reference is the adapter disabled or a frozen copy of
the SFT adapter, as in ``zhtune dpo``. Outputs as SFT's; each log line has TRL's reward, reward_std,
rewards/<name>/mean and completion lengths; ``--validation_file`` adds the held-out reward (eval_reward).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.args import DataArgs, LoraArgs, ModelArgs, TrainArgs
from zhtune.config.parse import Config, field
from zhtune.errors import ConfigError, DataError
from zhtune.train.args import TrainingConfig, training_arguments_fields
from zhtune.train.dpo import PrefRun, adapter_tokenizer
from zhtune.train.rewards import KINDS

log = logging.getLogger(__name__)
DESCRIPTION = (
    "Reinforcement learning with verifiable rewards (GRPO on TRL): labels, F1, regex, your own function."
)


@dataclass
class RewardArgs:
    """rewards and sampling"""

    reward: str = field(
        "exact", f"Reward of records without a reward or task field: one of {', '.join(KINDS)}."
    )
    task_rewards: dict[str, str] | None = field(
        None, "Reward of each task, for records with a 'task' field, e.g. '{sentiment: label, ner: f1}'."
    )
    extra_rewards: list[str] | None = field(
        None, "Rewards added on every record, comma separated (e.g. length,format); TRL sums them."
    )
    reward_fn: str | None = field(
        None, "Your reward function, path/to/file.py:function (your code, run as a Python module)."
    )
    reward_pattern: str | None = field(
        None, "regex reward: the pattern for records without a 'pattern' field."
    )
    reward_target_length: int | None = field(
        None, "length reward: the target reply length in characters (default: the reference's)."
    )
    num_generations: int = field(
        4, "Replies sampled per prompt (a group); the batch size must be a multiple."
    )
    max_completion_length: int = field(128, "Longest sampled reply in tokens.")
    temperature: float = field(1.0, "Sampling temperature of the replies.")
    beta: float = field(
        0.0, "Weight of the KL term to the reference (0: none, TRL's default; DeepSeek used 0.04)."
    )

    def __post_init__(self) -> None:
        for kind in [self.reward, *(self.extra_rewards or []), *(self.task_rewards or {}).values()]:
            if kind not in KINDS:
                raise ConfigError(f"unknown reward {kind!r}; one of {', '.join(KINDS)}")
        if "python" in [self.reward, *(self.extra_rewards or []), *(self.task_rewards or {}).values()]:
            if not self.reward_fn:
                raise ConfigError("reward python needs --reward_fn path/to/file.py:function")
        if self.num_generations < 2:
            raise ConfigError("--num_generations must be at least 2: GRPO compares replies within a group")
        if self.max_completion_length < 1 or self.temperature <= 0 or self.beta < 0:
            raise ConfigError("--max_completion_length and --temperature must be positive, --beta >= 0")


@dataclass
class GrpoTrainArgs(TrainArgs):
    """how to train (Hugging Face Trainer flags)"""

    learning_rate: float = field(2e-5, "Peak learning rate (LoRA; full fine-tuning wants about 1e-6).")
    per_device_train_batch_size: int = field(
        8, "Replies per device per step (a multiple of --num_generations)."
    )


class GrpoConfig(TrainingConfig):
    """zhtune grpo's configuration; ``GrpoConfig.of(dict)`` builds one from a dict or a recipe's mapping."""

    model: ModelArgs
    data: DataArgs
    lora: LoraArgs
    rewards: RewardArgs
    train: GrpoTrainArgs

    @classmethod
    def arguments_class(cls) -> type:
        from zhtune.deps import require

        return require("trl", "zhtune grpo").GRPOConfig

    @classmethod
    def passthrough(cls) -> dict[str, set[str]]:
        own = {f.name for sec in cls.section_types().values() for f in dataclasses.fields(sec)}
        return {"train": set(training_arguments_fields(cls.arguments_class())) - own}

    def arguments(self) -> tuple[type, dict[str, Any]]:
        r = self.rewards
        keep = ("num_generations", "max_completion_length", "temperature", "beta")
        return self.arguments_class(), {k: getattr(r, k) for k in keep}


CONFIG = GrpoConfig
SECTIONS = GrpoConfig.section_types()


@dataclass
class GrpoReport:
    records: int = 0
    bad_records: int = 0
    too_long: int = 0  # prompts that leave no room for --max_completion_length
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    train_samples: int = 0
    eval_samples: int = 0


def record_kind(rec: dict, r: RewardArgs) -> str:
    kind = rec.get("reward") or (r.task_rewards or {}).get(rec.get("task")) or r.reward
    if kind not in KINDS:
        raise ValueError(f"reward {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def read_prompts(
    paths: list[Path], tokenizer: Any, fmt: Any, d: DataArgs, r: RewardArgs, report: GrpoReport
) -> list[dict[str, Any]]:
    """One row per usable record: prompt token ids, reference, reward kind, task, pattern, prompt messages."""
    from zhtune.text.encode import SegmentEncoder
    from zhtune.text.records import ReadStats, iter_records, to_messages

    enc = SegmentEncoder(tokenizer)
    room = d.max_seq_length - r.max_completion_length
    stats, rows = ReadStats(), []
    for path in paths:
        for line, rec in iter_records(path, skip_bad_records=d.skip_bad_records, stats=stats):
            report.records += 1
            try:
                _, msgs = to_messages(rec)
                if msgs[-1]["role"] != "assistant":
                    raise ValueError("the last turn must be the assistant's reference reply")
                kind = record_kind(rec, r)
            except ValueError as e:
                if not d.skip_bad_records:
                    raise DataError(path, line, str(e)) from None
                report.bad_records += 1
                continue
            prompt = msgs[:-1]
            if d.system_prompt and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": d.system_prompt}, *prompt]
            ids = enc.prompt_ids(fmt, prompt)
            if len(ids) > room:
                report.too_long += 1
                continue
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            rows.append(
                {
                    "prompt": ids,
                    "reference": msgs[-1]["content"],
                    "reward": kind,
                    "task": str(rec.get("task") or ""),
                    "pattern": str(rec.get("pattern") or ""),
                    "messages": json.dumps(prompt, ensure_ascii=False),
                }
            )
    report.bad_records += stats.bad
    return rows


def build_grpo_data(tokenizer: Any, fmt: Any, d: DataArgs, r: RewardArgs) -> tuple[Any, Any, GrpoReport]:
    """The training prompts and optional held-out prompts (``--validation_file``), with a report."""
    from datasets import Dataset

    from zhtune.text.records import list_data_files

    paths = list_data_files(d.dataset_dir, d.train_files)
    if not paths:
        raise DataError("<config>", None, "no training data: pass --dataset_dir or --train_files")
    report = GrpoReport()
    rows = read_prompts(paths, tokenizer, fmt, d, r, report)
    held = (
        read_prompts([Path(d.validation_file)], tokenizer, fmt, d, r, GrpoReport())
        if d.validation_file
        else []
    )
    if d.max_train_samples:
        rows = rows[: d.max_train_samples]
    if d.max_eval_samples:
        held = held[: d.max_eval_samples]
    if not rows:
        raise DataError(
            paths[0], None, f"no usable prompt: {report.records} records, {report.bad_records} bad, "
            f"{report.too_long} too long for --max_seq_length {d.max_seq_length} less --max_completion_length",
        )  # fmt: skip
    report.train_samples, report.eval_samples = len(rows), len(held)
    return Dataset.from_list(rows), (Dataset.from_list(held) if held else None), report


def stop_ids(tokenizer: Any, fmt: Any) -> list[int]:
    """The template's end-of-turn tokens and the tokenizer's EOS: where a sampled reply ends."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[s] for s in fmt.stop_strings() if s in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def reward_functions(r: RewardArgs, train_ds: Any) -> list[Any]:
    from zhtune.train.rewards import TaskReward, load_function

    fn = load_function(r.reward_fn) if r.reward_fn else None
    labels = sorted({ref for ref, k in zip(train_ds["reference"], train_ds["reward"]) if k == "label"})
    common = {"labels": labels, "pattern": r.reward_pattern, "target_length": r.reward_target_length}
    funcs = [TaskReward("task", function=fn, **common)]
    funcs += [TaskReward(k, function=fn, kind=k, **common) for k in r.extra_rewards or []]
    return funcs


def build(cfg: GrpoConfig | Config | dict[str, Any]) -> PrefRun:
    """Everything up to training: the prologue, the prompts, the rewards, the model and TRL's trainer."""
    from zhtune.train.pref_trainers import ZhGRPOTrainer
    from zhtune.train.run import prologue, report_parameters, say

    cfg = GrpoConfig.of(cfg)
    d, lo, r, t = cfg.data, cfg.lora, cfg.rewards, cfg.train
    if r.max_completion_length >= d.max_seq_length:
        raise ConfigError(
            "--max_completion_length must be below --max_seq_length, to leave room for the prompt"
        )
    adapter_tokenizer(cfg)
    ctx = prologue(cfg)
    fmt = ctx.chat_format(d.template)
    train_ds, eval_ds, report = build_grpo_data(ctx.tokenizer, fmt, d, r)
    say(
        f"GRPO prompts: {report.train_samples} to train on, {report.eval_samples} held out; {report.records} "
        f"records, {report.bad_records} bad, {report.too_long} too long; rewards {report.kinds}"
    )
    funcs = reward_functions(r, train_ds)

    model, _ = ctx.load_model(full=lo.finetuning_type == "full")
    model.generation_config.eos_token_id = stop_ids(ctx.tokenizer, fmt)  # replies end at the end of the turn
    model = ctx.prepare(model, lo, tokens_per_step=t.per_device_train_batch_size * d.max_seq_length)
    report_parameters(model, "trainable parameters:")
    kw = {"fresh_adapter": lo.peft_path is None} if lo.finetuning_type != "full" else {}
    trainer = ctx.trainer(
        ZhGRPOTrainer, model=model, reward_funcs=funcs, train_dataset=train_ds, eval_dataset=eval_ds, **kw
    )
    return PrefRun(cfg, ctx, fmt, trainer, report, None, eval_ds)


def main(cfg: GrpoConfig | Config | dict[str, Any]) -> dict[str, Any]:
    """Run GRPO; returns a summary (metrics, data report, output paths)."""
    from zhtune.text.templates import attach

    run = build(cfg)
    metrics = run.ctx.fit(run.trainer, evaluate=run.eval_ds is not None)
    attach(run.fmt, run.ctx.tokenizer)
    summary = {
        "output_dir": str(run.ctx.out),
        "metrics": metrics,
        "data": dataclasses.asdict(run.report),
        "log_history": run.trainer.state.log_history,
        "template": run.fmt.name,
        "rewards": [f.__name__ for f in run.trainer.reward_funcs],
    }
    run.ctx.finish(run.trainer, run.fmt, summary)
    return summary


def cli(argv: list[str] | None = None) -> int:
    from zhtune.train.run import say

    summary = main(GrpoConfig.from_cli(argv, "zhtune grpo", DESCRIPTION))
    rewards = [h["reward"] for h in summary["log_history"] if "reward" in h]
    shown = f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else "no step logged"
    say(f"done: {shown}; outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())


__all__ = ["main", "cli", "GrpoConfig", "RewardArgs", "SECTIONS"]
