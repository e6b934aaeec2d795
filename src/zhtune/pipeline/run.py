"""``zhtune pipeline recipe.yaml``: run a recipe's stages in order in one run directory, resumably.

vocab train/merge -> pt (stage 1, stage 2) -> sft -> merge -> eval -> export, or any subset in that spirit:
each stage's output feeds the next (see :mod:`zhtune.pipeline.stages`).

Resuming: ``<run_dir>/pipeline_state.json`` records, per stage, a fingerprint of everything it reads (its
resolved options, the files and directories it names outside the run, and the fingerprint of the stage
before it) and the state it left. A re-run skips a stage whose fingerprint is unchanged and that finished;
a training stage that was interrupted resumes from its newest complete checkpoint; a changed stage runs
again from scratch, and so does every stage after it. The report (Markdown and PNG plots) is rewritten
after every stage.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from zhtune.config.parse import Config, build, parse_cli
from zhtune.errors import ConfigError
from zhtune.pipeline.recipe import SECTIONS, PipelineArgs, StageSpec, stage_config
from zhtune.pipeline.stages import COMMANDS, State, command_config, eval_specs

log = logging.getLogger(__name__)
DESCRIPTION = "Run a recipe's stages (vocab, pt, sft, merge, export, eval) in one run directory, resumably."
STATE_FILE = "pipeline_state.json"


def _digest_path(p: Path) -> str:
    """Size and modification time of a file, or of the files directly inside a directory."""
    if p.is_file():
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    parts = []
    for f in sorted(p.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _external_paths(value: Any, run_dir: Path, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _external_paths(v, run_dir, out)
    elif isinstance(value, list):
        for v in value:
            _external_paths(v, run_dir, out)
    elif isinstance(value, str) and len(value) < 4096:
        p = Path(value)
        try:
            exists = p.exists()
        except OSError:
            return
        if exists and run_dir.resolve() not in p.resolve().parents:
            out[value] = _digest_path(p)


def fingerprint(previous: str, spec: StageSpec, cfg: dict[str, Any], run_dir: Path) -> str:
    files: dict[str, str] = {}
    _external_paths(cfg, run_dir, files)
    blob = json.dumps(
        {"previous": previous, "command": spec.command, "options": cfg, "files": files},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Ledger:
    """pipeline_state.json: one record per stage, rewritten atomically at every change."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE_FILE
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{self.path}: malformed ({e.msg}); delete it to start the run over"
                ) from None

    def get(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def put(self, name: str, record: dict[str, Any]) -> None:
        self.data["stages"][name] = record
        self.save()

    def save(self) -> None:
        from zhtune.atomic import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.data, ensure_ascii=False, indent=2, default=str))

    def set_meta(self, **kw: Any) -> None:
        self.data.update(kw)


def _small(result: Any) -> Any:
    """What of a stage's result goes into the state file (losses kept, bulky fields dropped)."""
    if not isinstance(result, dict):
        return result
    out = {}
    for k, v in result.items():
        if k == "log_history":
            out[k] = [
                {kk: h[kk] for kk in ("step", "loss", "eval_loss", "num_input_tokens_seen") if kk in h}
                for h in v
                if "loss" in h or "eval_loss" in h
            ]
        elif k in ("config",):
            continue
        else:
            out[k] = v
    return out


def _latest_checkpoint(out: Path) -> str | None:
    if not out.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out))


def _run_command(spec: StageSpec, cfg: dict[str, Any], state: State, base: str) -> Any:
    module = importlib.import_module(COMMANDS[spec.command].module)
    opts = command_config(spec.command, cfg)
    if spec.command == "eval":
        return module.main(opts, models=eval_specs(cfg, base, state))
    return module.main(opts)


def _merge_input(
    spec: StageSpec, state: State, run_dir: Path, ledger: Ledger, previous: str, dry_run: bool
) -> str:
    """Merge pending adapters into a full model before a training stage (itself recorded and resumable)."""
    name = f"{spec.name}-input"
    out = run_dir / name
    cfg = {
        "model_name_or_path": state.model,
        "lora_models": list(state.adapters),
        "output_dir": str(out),
        "overwrite_output_dir": True,
    }
    fp = fingerprint(previous, StageSpec(name, "merge", {}), cfg, run_dir)
    rec = ledger.get(name)
    done = rec and rec.get("status") == "done" and rec.get("fingerprint") == fp and out.is_dir()
    if dry_run:
        print(
            f"== {name} (merge): {'done, skipped' if done else 'to run'}: {state.adapters} into {state.model}"
        )
    elif not done:
        print(f"== {name}: merging {len(state.adapters)} adapter(s) for {spec.name}", flush=True)
        t0 = time.time()
        ledger.put(name, {"command": "merge", "status": "running", "fingerprint": fp, "options": cfg})
        result = importlib.import_module(COMMANDS["merge"].module).main(cfg)
        ledger.put(
            name,
            {
                "command": "merge",
                "status": "done",
                "fingerprint": fp,
                "options": cfg,
                "seconds": round(time.time() - t0, 1),
                "result": _small(result),
            },
        )
    state.model, state.adapters = str(out), []
    return fp


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the state file's contents (with --compare: each arm's, by arm,
    and the comparison report's path)."""
    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    a: PipelineArgs = cfg.pipeline
    recipe = cfg.to_dict()["pipeline"]
    if not a.arm_runs:
        return run_stages(a, recipe)
    from zhtune.pipeline.compare import write_comparison

    arms: dict[str, Any] = {}
    for i, (name, seed, arm) in enumerate(a.arm_runs):
        label = name if seed is None else f"{name}/seed-{seed}"
        print(f"\n==== arm {label} ({i + 1} of {len(a.arm_runs)}): {arm.run_dir}", flush=True)
        about = (a.arms[name] or {}).get("about")
        meta = {**recipe, "arm": name, "seed": seed, "about": about, "stages": arm.stages}
        try:
            arms[label] = run_stages(arm, meta)
        finally:
            if not a.dry_run:  # the comparison so far, also when an arm fails
                write_comparison(Path(a.run_dir), [(n, s) for n, s, _ in a.arm_runs], a.compare_model)
    if a.dry_run:
        return {"arms": arms}
    return {"arms": arms, "report": str(Path(a.run_dir) / "compare" / "report.md")}


def run_stages(a: PipelineArgs, recipe: dict[str, Any]) -> dict[str, Any]:
    """One pipeline (a recipe, or one arm of it) in its run directory."""
    from zhtune.pipeline.report import write_report

    run_dir = Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(run_dir)
    ledger.set_meta(
        recipe=recipe, base_model=a.model_name_or_path, variant=a.variant or recipe.get("variant")
    )
    if recipe.get("arm"):
        ledger.set_meta(arm=recipe["arm"], seed=recipe.get("seed"), about=recipe.get("about"))
    state = State(model=a.model_name_or_path)
    previous, forced = "", False
    t_start = time.time()
    try:
        for spec in a.specs:
            forced = forced or spec.name in (a.rerun or [])
            if spec.command in ("pt", "sft") and state.adapters:
                previous = _merge_input(spec, state, run_dir, ledger, previous, a.dry_run)
            scfg = stage_config(spec, state, run_dir)
            fp = fingerprint(previous, spec, scfg, run_dir)
            rec = ledger.get(spec.name) or {}
            out = run_dir / spec.name
            done = rec.get("status") == "done" and rec.get("fingerprint") == fp and not forced
            if a.dry_run:
                print(f"== {spec.name} ({spec.command}): {'done, skipped' if done else 'to run'}")
                for k, v in scfg.items():
                    print(f"     {k}: {v}")
                if done:
                    state = State.from_dict(rec["state_after"])
                else:
                    COMMANDS[spec.command].advance(state, out, scfg, {}, True)
                previous = fp
                continue
            if done:
                print(f"== {spec.name} ({spec.command}): done earlier, skipped", flush=True)
                state = State.from_dict(rec["state_after"])
                previous = fp
                continue
            cmd = COMMANDS[spec.command]
            resume = None
            if cmd.trains and rec.get("status") == "running" and rec.get("fingerprint") == fp and not forced:
                resume = _latest_checkpoint(out)
            if resume:
                scfg = {**scfg, "resume_from_checkpoint": resume}
                print(f"== {spec.name} ({spec.command}): resuming from {resume}", flush=True)
            else:
                if out.exists() and cmd.trains:
                    shutil.rmtree(out)  # a fresh start must not find another run's checkpoints
                print(f"== {spec.name} ({spec.command}): running", flush=True)
            t0 = time.time()
            ledger.put(
                spec.name,
                {
                    "command": spec.command,
                    "status": "running",
                    "fingerprint": fp,
                    "options": scfg,
                    "started": t0,
                },
            )
            result = _run_command(spec, scfg, state, a.model_name_or_path)
            cmd.advance(state, out, scfg, result if isinstance(result, dict) else {}, False)
            ledger.put(
                spec.name,
                {
                    "command": spec.command,
                    "status": "done",
                    "fingerprint": fp,
                    "options": scfg,
                    "resumed_from": resume,
                    "started": t0,
                    "seconds": round(time.time() - t0, 1),
                    "result": _small(result),
                    "state_after": state.to_dict(),
                },
            )
            previous = fp
            write_report(run_dir, ledger.data, a)
    finally:
        if not a.dry_run and ledger.data["stages"]:
            ledger.set_meta(last_run_seconds=round(time.time() - t_start, 1))
            ledger.save()
            write_report(run_dir, ledger.data, a)
    return ledger.data


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune pipeline", description=DESCRIPTION)
    data = main(cfg)
    a = cfg.pipeline
    if not a.dry_run:
        report = data.get("report") or Path(a.run_dir) / "report" / "report.md"
        print(f"\ndone: report in {report}")
    return 0 if data else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
