"""What each pipeline command reads from the run so far, and what it leaves for the stages after it.

The run's :class:`State` is the model the next stage starts from (a directory or the base, plus adapters not
yet merged), a tokenizer waiting to be trained into the model, the last vocabulary learned, the demo data
files, and every model worth evaluating (``snapshots``). Each command fills its options from the state
(``wire``) unless the recipe sets them, and updates the state from its result (``advance``). With
``planned=True`` nothing has run: results are the paths the stage will write, which is how a recipe is
checked against every command before anything starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError


@dataclass
class State:
    model: str
    adapters: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # an extended tokenizer the model has not been resized to yet
    vocab: str | None = None  # the last vocabulary from vocab_train
    vocab_kind: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {model, adapters}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> State:
        return cls(**d)

    def copy(self) -> State:
        return State.from_dict(self.to_dict())


@dataclass
class Command:
    module: str  # has main(cfg) and SECTIONS
    wire: Callable[[dict, State, Path], dict]
    advance: Callable[[State, Path, dict, dict, bool], None]  # (state, out dir, options, result, planned)
    trains: bool = False  # resumable from checkpoint-N directories


def _fill(opts: dict, **defaults: Any) -> dict:
    out = dict(opts)
    for k, v in defaults.items():
        if k not in out and v is not None:
            out[k] = v
    return out


# ---- data and vocabulary ----


def _wire_data(opts: dict, st: State, out: Path) -> dict:
    return _fill(opts, output_dir=str(out), overwrite_output_dir=True)


def _advance_data(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
    from zhtune.demo.build import FILES

    st.data.update(res["files"] if not planned else {k: str(out / v) for k, v in FILES.items()})


def _wire_vocab_train(opts: dict, st: State, out: Path) -> dict:
    return _fill(opts, output_dir=str(out), base_tokenizer=st.model, overwrite_output_dir=True)


def _advance_vocab_train(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
    st.vocab, st.vocab_kind = (str(out), None) if planned else (res["path"], res["kind"])


def _wire_vocab_merge(opts: dict, st: State, out: Path) -> dict:
    o = _fill(opts, output_dir=str(out), base_tokenizer=st.model, overwrite_output_dir=True)
    if not (o.get("vocab") or o.get("chinese_sp_model_file")):
        if st.vocab is None:
            raise ConfigError(
                "vocab_merge: no vocab_train stage before it; set vocab or chinese_sp_model_file"
            )
        o["chinese_sp_model_file" if st.vocab_kind == "sentencepiece" else "vocab"] = st.vocab
    return o


def _advance_vocab_merge(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
    st.tokenizer = str(out)


# ---- training ----


def _wire_train(opts: dict, st: State, out: Path) -> dict:
    if st.adapters:
        raise ConfigError("internal: adapters must be merged before a training stage")
    return _fill(
        opts,
        model_name_or_path=st.model,
        tokenizer_name_or_path=st.tokenizer,
        output_dir=str(out),
        report_to="none",
        data_cache_dir=str(out.parent / "cache"),
    )


def _advance_train(kind_key: str, adapter_kinds: tuple[str, ...]) -> Callable:
    def advance(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
        default = "lora"
        if opts.get(kind_key, default) in adapter_kinds:
            st.adapters = [str(out)]
            st.snapshots[out.name] = {"model": st.model, "adapters": [str(out)]}
        else:
            st.model, st.adapters = str(out), []
            st.snapshots[out.name] = {"model": str(out), "adapters": []}
        st.tokenizer = None  # the output carries the tokenizer it was trained with

    return advance


def _wire_align(opts: dict, st: State, out: Path) -> dict:
    """dpo, grpo: after a LoRA stage they continue its adapter (its reference is that stage's model);
    after a full or merged stage they start a fresh adapter (or full weights) on its model."""
    full = opts.get("finetuning_type", "lora") == "full"
    if st.adapters and (full or len(st.adapters) > 1):
        raise ConfigError(
            f"{out.name}: {len(st.adapters)} adapter(s) not merged yet; put a merge stage before it"
            if not full
            else f"{out.name}: --finetuning_type full needs a merged model; put a merge stage before it"
        )
    o = _fill(
        opts,
        model_name_or_path=st.model,
        tokenizer_name_or_path=st.tokenizer,
        output_dir=str(out),
        report_to="none",
        data_cache_dir=str(out.parent / "cache"),
    )
    if st.adapters and "peft_path" not in opts:
        o["peft_path"] = st.adapters[0]
    return o


# ---- merge, export, eval ----


def _wire_merge(opts: dict, st: State, out: Path) -> dict:
    if not st.adapters and not opts.get("lora_models"):
        raise ConfigError("merge: no stage before it left an adapter to merge")
    return _fill(
        opts,
        model_name_or_path=st.model,
        lora_models=list(st.adapters),
        output_dir=str(out),
        overwrite_output_dir=True,
    )


def _advance_merge(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
    st.model, st.adapters = str(out), []
    st.snapshots[out.name] = {"model": str(out), "adapters": []}


def _wire_export(opts: dict, st: State, out: Path) -> dict:
    quant = opts.get("quant", "f16")
    return _fill(
        opts,
        model_name_or_path=st.model,
        lora_models=list(st.adapters) or None,
        output_dir=str(out),
        gguf_name=f"{out.name}-{quant}.gguf",
        overwrite_output_dir=True,
    )


def _advance_export(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
    path = res.get("path") if not planned else None
    st.snapshots[out.name] = {
        "model": path or str(out / f"{out.name}-{opts.get('quant', 'f16')}.gguf"),
        "adapters": [],
    }


EVAL_ONLY = ("models", "base")  # pipeline options of an eval stage, not zhtune eval's


def _wire_eval(opts: dict, st: State, out: Path) -> dict:
    o = _fill(opts, output_dir=str(out))
    wanted = o.get("models", "all")
    names = list(st.snapshots) if wanted in ("all", None) else list(wanted)
    unknown = [n for n in names if n not in st.snapshots]
    if unknown:
        raise ConfigError(
            f"eval: models {unknown} are not stages before it that leave a model (those are: "
            f"{', '.join(st.snapshots) or 'none'})"
        )
    o["models"] = names
    return o


def eval_specs(o: dict, base: str, st: State) -> list[Any]:
    from zhtune.eval.cli import ModelSpec

    specs = [ModelSpec("base", base, [])] if o.get("base", True) else []
    for n in o["models"]:
        snap = st.snapshots[n]
        specs.append(ModelSpec(n, snap["model"], list(snap["adapters"])))
    return specs


def _advance_eval(st: State, out: Path, opts: dict, res: dict, planned: bool) -> None:
    return None


COMMANDS: dict[str, Command] = {
    "demo_data": Command("zhtune.demo.build", _wire_data, _advance_data),
    "vocab_train": Command("zhtune.vocab.train", _wire_vocab_train, _advance_vocab_train),
    "vocab_merge": Command("zhtune.vocab.merge", _wire_vocab_merge, _advance_vocab_merge),
    "pt": Command("zhtune.train.pt", _wire_train, _advance_train("stage", ("lora",)), trains=True),
    "sft": Command(
        "zhtune.train.sft", _wire_train, _advance_train("finetuning_type", ("lora",)), trains=True
    ),
    "dpo": Command(
        "zhtune.train.dpo", _wire_align, _advance_train("finetuning_type", ("lora",)), trains=True
    ),
    "grpo": Command(
        "zhtune.train.grpo", _wire_align, _advance_train("finetuning_type", ("lora",)), trains=True
    ),
    "merge": Command("zhtune.merge.merge", _wire_merge, _advance_merge),
    "export": Command("zhtune.export.export", _wire_export, _advance_export),
    "eval": Command("zhtune.eval.cli", _wire_eval, _advance_eval),
}


def sections(module: Any) -> tuple[dict[str, type], dict[str, set[str]]]:
    """A command module's config sections and the options it passes through as they are: a training
    command's typed config (``CONFIG``) declares both; other commands pass nothing through."""
    config = getattr(module, "CONFIG", None)
    if config is not None:
        return config.section_types(), config.passthrough()
    return module.SECTIONS, {}


def command_config(command: str, opts: dict) -> dict:
    """The options a command's main() takes (the pipeline's own eval options removed)."""
    if command == "eval":
        return {k: v for k, v in opts.items() if k not in EVAL_ONLY}
    return dict(opts)
