"""Kill -9 a tiny training run at chosen points, resume it, and compare with an uninterrupted run.

Run as ``python crash_runner.py plan.json result.json``. The process imports torch, transformers and zhtune
once, then forks one child per run, so a run starts in a fraction of a second and a SIGKILL hits training,
not imports. For each scenario of the plan:

1. a reference child trains without interruption (and is timed);
2. a chain of children trains into one output directory with ``--resume_from_checkpoint auto``, each killed
   with SIGKILL at one point: an injected point (a test-only wrapper around one zhtune or transformers call
   in that child, which kills the process from inside) or a random time after the fork (killed from here);
3. after every kill, every ``checkpoint-N`` directory must be complete and loadable;
4. a last child resumes and finishes; its weights and loss curve must equal the reference's bit for bit.

Test-only: the wrappers exist only in the forked children of this script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft.peft_model  # noqa: E402
import safetensors.torch  # noqa: E402
import transformers  # noqa: E402
import transformers.modeling_utils  # noqa: E402

import zhtune.atomic  # noqa: E402
import zhtune.train.guard  # noqa: E402
import zhtune.train.outputs  # noqa: E402
import zhtune.train.state  # noqa: E402
import zhtune.train.trainer  # noqa: E402
from zhtune.train.dpo import main as dpo_main  # noqa: E402
from zhtune.train.pref_trainers import ZhDPOTrainer  # noqa: E402
from zhtune.train.pt import main as pt_main  # noqa: E402
from zhtune.train.sft import main as sft_main  # noqa: E402

MAINS = {"sft": sft_main, "pt": pt_main, "dpo": dpo_main}

STATE_FILES = ("trainer_state.json", "optimizer.json", "scheduler.json", "rng_state.json")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_calls(n: int, fn, before: bool = False):  # noqa: ANN001, ANN201
    """Wrap ``fn`` so that its n-th call in this process kills the process (before or after the call)."""
    count = {"n": 0}

    def wrapper(*a, **kw):  # noqa: ANN002, ANN003
        count["n"] += 1
        if count["n"] == n and before:
            die()
        out = fn(*a, **kw)
        if count["n"] == n:
            die()
        return out

    return wrapper


def inject(kill: dict, command: str) -> None:
    """Install one kill point in this (forked) child of a ``command`` run."""
    kind, n = kill["type"], kill.get("nth", 1)
    T = ZhDPOTrainer if command == "dpo" else zhtune.train.trainer.ZhTrainer
    if kind == "step":  # mid-step: after a backward, before the optimizer applies the update
        orig = T.training_step
        start: list[int] = []

        def training_step(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
            start.append(start[0] if start else self.state.global_step)  # the step this run resumed at
            out = orig(self, *a, **kw)
            if self.state.global_step == start[0] + kill["after"]:
                die()
            return out

        T.training_step = training_step
    elif kind == "model_saved":  # checkpoint: weights written, optimizer state not yet
        T.save_model = after_calls(n, T.save_model)
    elif kind == "state_write":  # checkpoint: in the middle of a state file (half of it on disk)
        orig = zhtune.train.state.save_state
        count = {"n": 0}

        def save_state(obj, directory, name):  # noqa: ANN001
            count["n"] += 1
            files = orig(obj, directory, name)
            if count["n"] == n:
                data = files[0].read_bytes()
                files[0].write_bytes(data[: len(data) // 2])
                die()
            return files

        zhtune.train.state.save_state = save_state
    elif kind == "trainer_state":  # checkpoint: trainer_state.json half written
        orig = transformers.TrainerState.save_to_json
        count = {"n": 0}

        def save_to_json(self, path):  # noqa: ANN001
            count["n"] += 1
            if count["n"] == n and "checkpoint" in str(path):
                Path(path).write_text(json.dumps(dataclasses.asdict(self))[:40])
                die()
            return orig(self, path)

        transformers.TrainerState.save_to_json = save_to_json
    elif kind == "before_rename":  # checkpoint complete in its temporary directory, not yet renamed
        zhtune.train.trainer.fsync_tree = after_calls(n, zhtune.train.trainer.fsync_tree)
    elif kind == "rotation":  # --save_total_limit: the old checkpoint renamed away, not yet deleted
        orig_remove = zhtune.train.guard.remove_dir
        count = {"n": 0}

        def remove_dir(p):  # noqa: ANN001
            count["n"] += 1
            if count["n"] == n:
                p.rename(zhtune.atomic.tmp_sibling(p))
                die()
            return orig_remove(p)

        zhtune.train.guard.remove_dir = remove_dir
    elif kind == "final_publish":  # the final outputs: half of the files moved into the output directory

        def publish_files(staging, dest, last=()):  # noqa: ANN001
            dest.mkdir(parents=True, exist_ok=True)
            names = sorted(p.name for p in staging.iterdir())
            for name in names[: len(names) // 2]:
                os.replace(staging / name, dest / name)
            die()

        zhtune.train.outputs.publish_files = publish_files
    elif kind == "weights_write":  # inside the write of a weights file (LoRA: peft, full: transformers)
        count = {"n": 0}
        for mod in (peft.peft_model, transformers.modeling_utils):
            orig_save = mod.safe_save_file

            def save_file(tensors, filename, metadata=None, _orig=orig_save):  # noqa: ANN001
                count["n"] += 1
                if count["n"] == n:
                    Path(filename).write_bytes(b"\0" * 100)
                    die()
                return _orig(tensors, filename, metadata=metadata)

            mod.safe_save_file = save_file
    elif kind == "resume_load":  # while a resumed run reads its checkpoint
        T._load_rng_state = after_calls(n, T._load_rng_state, before=True)
    elif kind != "time":
        raise ValueError(f"unknown kill type {kind}")


def run_child(kind: str, cfg: dict, kill: dict | None) -> int:
    """Fork a child that trains (with a kill point installed); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            if kill:
                inject(kill, kind)
            MAINS[kind](cfg)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent through the exit code
            sys.stderr.write(f"child failed: {type(e).__name__}: {e}\n")
        finally:
            os._exit(code)
    return pid


def wait(pid: int, kill_after: float | None = None) -> str:
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return describe(status)
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return describe(status)


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "finished" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def check_checkpoints(out: Path) -> list[str]:
    """Problems with any checkpoint-N directory: every one must be complete and load."""
    problems = []
    for _, ck in zhtune.train.guard.checkpoints(out):
        missing = [f for f in STATE_FILES if not (ck / f).is_file()]
        weights = list(ck.glob("*.safetensors"))
        if missing or not weights:
            problems.append(f"{ck.name}: missing {missing or 'weights'}")
            continue
        try:
            json.loads((ck / "trainer_state.json").read_text())
            for name in ("optimizer", "scheduler", "rng_state"):
                zhtune.train.state.load_state(ck, name)
            for w in weights:
                safetensors.torch.load_file(str(w))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{ck.name}: {type(e).__name__}: {e}")
        pickles = [p.name for p in ck.iterdir() if p.suffix in (".pt", ".pth", ".bin")]
        if pickles:
            problems.append(f"{ck.name}: pickle files {pickles}")
    return problems


def weights(out: Path) -> dict[str, torch.Tensor]:
    f = out / (
        "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    )
    return safetensors.torch.load_file(str(f))


def curve(out: Path) -> list[dict]:
    hist = json.loads((out / "log_history.json").read_text())
    return [
        {k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in h}
        for h in hist
        if "loss" in h
    ]


def scenario(s: dict, root: Path, rng: random.Random) -> dict:
    kind, cfg = s["kind"], s["cfg"]
    ref = root / f"{s['name']}-ref"
    t0 = time.monotonic()
    status = wait(run_child(kind, {**cfg, "output_dir": str(ref)}, None))
    duration = time.monotonic() - t0
    assert status == "finished", f"{s['name']}: the reference run {status}"
    out = root / f"{s['name']}-chain"
    run_cfg = {**cfg, "output_dir": str(out), "resume_from_checkpoint": "auto"}
    kills = []
    for kill in s["kills"]:
        if kill["type"] == "time":
            delay = rng.uniform(0.15, 0.6) * duration
            status = wait(run_child(kind, run_cfg, None), kill_after=delay)
            kill = {**kill, "after_s": round(delay, 3)}
        else:
            status = wait(run_child(kind, run_cfg, kill))
        leftovers = (
            sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-")) if out.is_dir() else []
        )
        kills.append(
            {
                **kill,
                "status": status,
                "checkpoints": [p.name for _, p in zhtune.train.guard.checkpoints(out)],
                "tmp_leftovers": leftovers,
                "problems": check_checkpoints(out),
            }
        )
    status = wait(run_child(kind, run_cfg, None))
    assert status == "finished", f"{s['name']}: the final resume {status}"
    w_ref, w_out = weights(ref), weights(out)
    same_weights = w_ref.keys() == w_out.keys() and all(torch.equal(w_ref[k], w_out[k]) for k in w_ref)
    return {
        "name": s["name"],
        "reference_seconds": round(duration, 2),
        "kills": kills,
        "same_weights": same_weights,
        "same_curve": curve(ref) == curve(out),
        "curve": curve(out),
        "reference_curve": curve(ref),
        "tmp_leftovers_after_resume": sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-")),
        "final_checkpoints": [p.name for _, p in zhtune.train.guard.checkpoints(out)],
        "pickles": sorted(
            str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin")
        ),
    }


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    root = Path(plan["root"])
    rng = random.Random(plan.get("seed", 0))
    results = [scenario(s, root, rng) for s in plan["scenarios"]]
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
