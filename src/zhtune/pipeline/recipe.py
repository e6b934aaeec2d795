"""A pipeline recipe: the stages to run in one run directory, each a zhtune command with its options.

    run_dir: runs/demo-zh
    model_name_or_path: default
    stages:
      - {name: data, command: demo_data, with: {sentiment_train: 2000}}
      - {name: pt1, command: pt, with: {stage: embeddings, train_files: ["${data.news_train}"]}}
      ...
    variants:
      quick: {run_dir: runs/demo-zh-quick, stages: {pt1: {max_steps: 20}}}
    arms:
      plain: {skip: [vocab, tokenizer, pt1, pt2], about: SFT on the base model}
      full: {about: vocabulary + pre-training + SFT}

Each stage writes to ``<run_dir>/<name>``. Options a stage does not set come from the run so far (see
:mod:`zhtune.pipeline.stages`): the model to start from, the tokenizer to resize to, adapters to merge.
Strings may refer to ``${run_dir}``, ``${data.NAME}`` (a file of the demo_data stage) and ``${stage.NAME}``
(a stage's output directory). A variant overrides top-level options and, per stage, options of ``with``;
``--stage_options '{sft: {max_steps: 10}}'`` overrides stage options from the command line, over the variant.
An arm is a variant run beside the others for comparison: ``--compare plain,full`` (or ``all``) runs each arm
in ``<run_dir>/arms/<arm>`` on the same data and eval (``--seeds 1,2,3``: once per training seed) (see :mod:`zhtune.pipeline.compare`); an arm may skip
stages and override stage options, over the variant's. A stage a variant or an arm skips leaves eval's ``models``.
Loading a recipe checks every stage against its command, so a typo fails before hours of training.
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zhtune.config.parse import build, field
from zhtune.errors import ConfigError

TRAINING = ("pt", "sft", "dpo", "grpo")  # the commands a seed changes
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
REF = re.compile(r"\$\{([^}]*)\}")


@dataclass
class StageSpec:
    name: str
    command: str
    options: dict[str, Any]


@dataclass
class PipelineArgs:
    """the stages and where they run"""

    run_dir: str = field(
        "runs/pipeline", "Run directory: every stage's output, the state file and the report."
    )
    model_name_or_path: str = field(
        "default", "The base model the first stage starts from (and that eval compares with)."
    )
    stages: list[dict] = field(
        factory=list,
        help="Stages in order: {name, command, with: {options}}; commands: demo_data, vocab_train, vocab_merge, "
        "pt, sft, merge, export, eval.",
    )
    variants: dict = field(
        factory=dict,
        help="Named overrides, e.g. quick: {run_dir: ..., stages: {NAME: {option: value}}, skip: [NAME]}.",
    )
    variant: str | None = field(None, "Apply this variant of the recipe.")
    arms: dict = field(
        factory=dict,
        help="Comparison arms, e.g. plain: {skip: [vocab, pt], stages: {NAME: {option: value}}, about: text}; "
        "run them with --compare.",
    )
    compare: list[str] | None = field(
        None,
        "Run these arms of the recipe ('all': every arm) one after the other, each in <run_dir>/arms/<arm>, and "
        "write one report with the arms side by side in <run_dir>/compare.",
    )
    seeds: list[int] | None = field(
        None,
        "With --compare: run each arm once per seed (every training stage's --seed), in "
        "<run_dir>/arms/<arm>/seed-<N>; the report gives each metric's mean and spread over the seeds.",
    )
    compare_model: str | None = field(
        None, "The evaluated stage the arms are compared by (default: the last model each arm's eval scores)."
    )
    stage_options: dict = field(
        factory=dict,
        help="Stage options over the recipe's and the variant's, e.g. --stage_options '{sft: {max_steps: 10}}'.",
    )
    quick: bool = field(False, "Shorthand for --variant quick.")
    report_text: list[str] | None = field(
        None, "Text files for the report's tokenizer statistics (default: the eval stage's text files)."
    )
    rerun: list[str] | None = field(None, "Run these stages again, and every stage after them, even if done.")
    dry_run: bool = field(False, "Print each stage's resolved options and whether it is done; run nothing.")

    def __post_init__(self) -> None:
        if self.quick:
            if self.variant not in (None, "quick"):
                raise ConfigError("--quick is --variant quick; give one of them")
            self.variant = "quick"
        recipe_stages = {s.get("name") for s in self.stages if isinstance(s, dict)}
        if self.variant:
            apply_variant(self, self.variant)
        self.stages = override_stages(self.stages, self.stage_options, "--stage_options")
        self.specs = parse_stages(self.stages)
        self.arm_runs: list[tuple[str, int | None, PipelineArgs]] = []
        if self.seeds is not None and (
            not self.compare or not self.seeds or len(set(self.seeds)) < len(self.seeds)
        ):
            raise ConfigError("--seeds: distinct seeds, with --compare (e.g. --compare all --seeds 1,2,3)")
        if self.compare:
            # every arm is checked against every command now, so a typo in the last arm fails before the first
            seeds = self.seeds or [None]
            self.arm_runs = [
                (n, s, arm_args(self, n, recipe_stages, s)) for n in arm_names(self) for s in seeds
            ]
            for name in self.rerun or []:
                if not any(name in {s.name for s in arm.specs} for _, _, arm in self.arm_runs):
                    raise ConfigError(f"--rerun {name}: no arm has such a stage")
            return
        for name in self.rerun or []:
            if name not in {s.name for s in self.specs}:
                raise ConfigError(f"--rerun {name}: no such stage ({', '.join(s.name for s in self.specs)})")
        check_plan(self)


SECTIONS = {"pipeline": PipelineArgs}


def apply_variant(a: PipelineArgs, name: str) -> None:
    if name not in a.variants:
        known = ", ".join(a.variants) or "none"
        raise ConfigError(f"--variant {name}: the recipe has no such variant (it has: {known})")
    v = a.variants[name] or {}
    unknown = set(v) - {"run_dir", "model_name_or_path", "stages", "skip", "report_text"}
    if unknown:
        raise ConfigError(
            f"variants.{name}: unknown keys {sorted(unknown)} (run_dir, model_name_or_path, stages, skip, "
            "report_text)"
        )
    for key in ("run_dir", "model_name_or_path", "report_text"):
        if key in v:
            setattr(a, key, v[key])
    stages = override_stages(a.stages, v.get("stages") or {}, f"variants.{name}.stages")
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    skip = v.get("skip") or []
    if not isinstance(skip, list) or any(s not in names for s in skip):
        raise ConfigError(f"variants.{name}.skip: a list of stage names ({', '.join(map(str, names))})")
    a.stages = without(stages, skip)


def arm_names(a: PipelineArgs) -> list[str]:
    if not a.arms:
        raise ConfigError(
            "--compare: the recipe has no arms (add arms: {NAME: {skip: [...], stages: {...}}})"
        )
    names = list(a.arms) if a.compare == ["all"] else list(dict.fromkeys(a.compare or []))
    for n in names:
        if n not in a.arms:
            raise ConfigError(f"--compare {n}: the recipe has no such arm (it has: {', '.join(a.arms)})")
    return names


def arm_args(a: PipelineArgs, name: str, recipe_stages: set[str], seed: int | None = None) -> PipelineArgs:
    """The pipeline of one arm: the recipe (variant and --stage_options applied) with the arm's skips and
    options, in <run_dir>/arms/<name> (``seed``: every training stage's seed, in .../seed-<seed>). Skipped
    stages leave eval's ``models``; every arm keeps the base."""
    v = a.arms[name] or {}
    if not isinstance(v, dict):
        raise ConfigError(f"arms.{name}: a mapping {{skip, stages, model_name_or_path, about}}")
    unknown = set(v) - {"skip", "stages", "model_name_or_path", "about"}
    if unknown:
        raise ConfigError(
            f"arms.{name}: unknown keys {sorted(unknown)} (skip, stages, model_name_or_path, about)"
        )
    skip = v.get("skip") or []
    if not isinstance(skip, list) or any(s not in recipe_stages for s in skip):
        raise ConfigError(f"arms.{name}.skip: a list of stage names ({', '.join(map(str, recipe_stages))})")
    present = {s.get("name") for s in a.stages}
    over = v.get("stages") or {}
    if not isinstance(over, dict):
        raise ConfigError(f"arms.{name}.stages: a mapping of stage name: {{option: value}}")
    over = {k: o for k, o in over.items() if not (k in recipe_stages and k not in present)}  # variant skipped
    stages = without(override_stages(a.stages, over, f"arms.{name}.stages"), skip)
    if seed is not None:
        for s in stages:
            if s.get("command") in TRAINING:
                s["with"] = {**(s.get("with") or {}), "seed": seed}
    names = {s.get("name") for s in stages}
    run_dir = Path(a.run_dir) / "arms" / name
    return PipelineArgs(
        run_dir=str(run_dir / f"seed-{seed}" if seed is not None else run_dir),
        model_name_or_path=v.get("model_name_or_path", a.model_name_or_path),
        stages=stages,
        report_text=a.report_text,
        rerun=[r for r in a.rerun or [] if r in names] or None,
        dry_run=a.dry_run,
    )


def without(stages: list[Any], skip: list[str]) -> list[Any]:
    """The stages not in ``skip``; an eval stage's ``models`` forget the skipped ones."""
    out = [s for s in stages if s.get("name") not in skip]
    for s in out:
        opts = s.get("with") or {}
        if s.get("command") == "eval" and isinstance(opts.get("models"), list):
            s["with"] = {**opts, "models": [m for m in opts["models"] if m not in skip]}
    return out


def override_stages(stages: list[Any], overrides: Any, where: str) -> list[Any]:
    """A copy of ``stages`` with ``{NAME: {option: value}}`` merged into each named stage's ``with``."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: a mapping of stage name: {{option: value}}")
    stages = copy.deepcopy(stages)
    by_name = {s.get("name"): s for s in stages if isinstance(s, dict)}
    for sname, over in overrides.items():
        if sname not in by_name:
            raise ConfigError(f"{where}: no stage named {sname!r} ({', '.join(map(str, by_name))})")
        if not isinstance(over, dict):
            raise ConfigError(f"{where}.{sname}: a mapping of option: value")
        by_name[sname]["with"] = {**(by_name[sname].get("with") or {}), **over}
    return stages


def parse_stages(raw: list[Any]) -> list[StageSpec]:
    from zhtune.pipeline.stages import COMMANDS

    if not raw:
        raise ConfigError("the recipe has no stages")
    out: list[StageSpec] = []
    for i, s in enumerate(raw):
        where = f"stages[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: a stage is a mapping {{name, command, with}}")
        unknown = set(s) - {"name", "command", "with"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; a stage has name, command and with")
        name, command = s.get("name"), s.get("command")
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be letters, digits, '-', '_' or '.'")
        if command not in COMMANDS:
            raise ConfigError(f"stage {name}: unknown command {command!r}; one of {', '.join(COMMANDS)}")
        if name in {x.name for x in out}:
            raise ConfigError(f"stage {name}: two stages have this name")
        opts = s.get("with") or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"stage {name}: 'with' is a mapping of option: value")
        out.append(StageSpec(name, command, dict(opts)))
    return out


def interpolate(value: Any, run_dir: Path, state: Any, stage: str) -> Any:
    """Replace ${run_dir}, ${data.NAME} and ${stage.NAME} in strings (recursively in lists and mappings)."""
    if isinstance(value, dict):
        return {k: interpolate(v, run_dir, state, stage) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, run_dir, state, stage) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key == "run_dir":
            return str(run_dir)
        kind, _, name = key.partition(".")
        if kind == "data":
            if name not in state.data:
                have = ", ".join(state.data) or "none (no demo_data stage before it)"
                raise ConfigError(f"stage {stage}: ${{{key}}}: no such data file; there are: {have}")
            return state.data[name]
        if kind == "stage":
            return str(run_dir / name)
        raise ConfigError(
            f"stage {stage}: unknown reference ${{{key}}} (use run_dir, data.NAME or stage.NAME)"
        )

    return REF.sub(sub, value)


def stage_config(spec: StageSpec, state: Any, run_dir: Path) -> dict[str, Any]:
    """A stage's options: the recipe's (references resolved), then what the run so far supplies."""
    from zhtune.pipeline.stages import COMMANDS

    opts = interpolate(spec.options, run_dir, state, spec.name)
    return COMMANDS[spec.command].wire(opts, state, run_dir / spec.name)


def validate(spec: StageSpec, cfg: dict[str, Any]) -> None:
    from zhtune.pipeline.stages import COMMANDS, command_config, sections

    module_name = COMMANDS[spec.command].module
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"stage {spec.name}: command {spec.command} needs {module_name}, which cannot be imported ({e})"
        ) from None
    secs, passthrough = sections(module)
    try:
        build(secs, command_config(spec.command, cfg), passthrough=passthrough)
    except ConfigError as e:
        raise ConfigError(f"stage {spec.name} ({spec.command}): {e}") from None


def check_plan(a: PipelineArgs) -> None:
    """Walk the stages with the outputs they will write, checking every stage's options against its command."""
    from zhtune.pipeline.stages import COMMANDS, State

    run_dir = Path(a.run_dir)
    state = State(model=a.model_name_or_path)
    for spec in a.specs:
        if spec.command in ("pt", "sft") and state.adapters:
            state.model, state.adapters = str(run_dir / f"{spec.name}-input"), []
        cfg = stage_config(spec, state, run_dir)
        validate(spec, cfg)
        COMMANDS[spec.command].advance(state, run_dir / spec.name, cfg, {}, True)
