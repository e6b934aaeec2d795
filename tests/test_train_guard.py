"""What stops a training run cleanly: NaN/inf losses (stop or skip), fp16 loss-scale collapse, a full disk while
saving, and --save_total_limit rotation that never deletes the checkpoint a resume needs."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from extended_vocab import made_up_chinese
from safetensors.torch import load_file
from transformers import TrainerCallback

from zhtune.cli import main as zhtune
from zhtune.errors import TrainingStopped
from zhtune.train import guard, state
from zhtune.train.guard import LossScaleMonitor, rotate
from zhtune.train.pt import main as pt


@pytest.fixture(scope="module")
def work(tmp_path_factory, bpe_tokenizer_dir):
    w = tmp_path_factory.mktemp("guard")
    model = make_tiny_model(bpe_tokenizer_dir, w / "model")
    (w / "data").mkdir()
    made_up_chinese(w / "data" / "a.txt", n=60, seed=5)
    return {"dir": w, "model": model}


def cfg(work, out: Path, **kw) -> dict:
    return {
        "model_name_or_path": str(work["model"]),
        "dataset_dir": str(work["dir"] / "data"),
        "data_cache_dir": str(work["dir"] / "cache"),
        "block_size": 32,
        "max_steps": 5,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 1,
        "save_total_limit": 2,
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "output_dir": str(out),
        **kw,
    }


class PoisonWeights(TrainerCallback):
    """After optimizer step ``after``, a weight becomes NaN: every later loss is NaN."""

    def __init__(self, after: int):
        self.after = after

    def on_step_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
        if state.global_step == self.after:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "norm" in n).fill_(float("nan"))


class PoisonSteps(TrainerCallback):
    """The forward passes of the given optimizer steps (1-based) return NaN activations; others are clean."""

    def __init__(self, steps: set[int]):
        self.steps, self.handle = steps, None

    def on_step_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
        if state.global_step + 1 in self.steps:
            emb = model.get_input_embeddings()
            self.handle = emb.register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(work, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 3 .*--nan_policy skip") as e:
        pt(cfg(work, out), callbacks=[PoisonWeights(after=2)])
    assert "checkpoint after step 2" in str(e.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter_config.json").exists()  # no final outputs from a broken run
    # the last good checkpoint resumes (the poison is gone, so the run now finishes)
    summary = pt(cfg(work, out, resume_from_checkpoint="true"))
    assert [h["step"] for h in summary["log_history"] if "loss" in h] == [1, 2, 3, 4, 5]


def test_nan_policy_skip_drops_and_counts_the_bad_steps(work, tmp_path):
    out = tmp_path / "skip"
    summary = pt(cfg(work, out, nan_policy="skip", save_steps=100), callbacks=[PoisonSteps({2, 4})])
    logs = [h for h in summary["log_history"] if "loss" in h]
    assert [h["skipped_steps"] for h in logs] == [0, 1, 1, 2, 2]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    with pytest.raises(
        TrainingStopped, match=r"3 steps had a NaN/inf loss .*steps \[1, 2, 3\].*--max_skipped_steps 2"
    ):
        pt(
            cfg(work, tmp_path / "skip2", nan_policy="skip", max_skipped_steps=2),
            callbacks=[PoisonSteps({1, 2, 3})],
        )


def test_nan_stop_through_the_cli_is_one_clear_line(work, tmp_path, capsys, monkeypatch):
    import zhtune.train.pt as ptmod

    real = ptmod.main
    monkeypatch.setattr(ptmod, "main", lambda c: real(c, callbacks=[PoisonWeights(after=1)]))
    args = [f"--{k}={v}" for k, v in cfg(work, tmp_path / "cli").items()]
    assert zhtune(["pt", *args]) == 1
    err = capsys.readouterr().err
    assert "zhtune pt: the training loss became nan at step 2" in err and "Traceback" not in err


def test_fp16_overflow_is_counted_and_a_collapsed_scale_stops():
    mon = LossScaleMonitor(lambda: None)
    mon.observe(65536.0, 65536.0, 1, "out")
    mon.observe(65536.0, 32768.0, 2, "out")
    assert (mon.overflows, mon.in_a_row) == (1, 1)
    mon.observe(32768.0, 32768.0, 3, "out")
    assert mon.in_a_row == 0
    with pytest.raises(TrainingStopped, match=r"fp16 loss scale collapsed to 0.5 at step 4 .*--bf16"):
        mon.observe(1.0, 0.5, 4, "out")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(work, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real = state.save_state
    calls = {"n": 0}

    def save_state(obj, directory, name):  # noqa: ANN001
        calls["n"] += 1
        if (
            calls["n"] == 6
        ):  # checkpoint-1 wrote 3 states (optimizer, scheduler, rng): this is checkpoint-2's 3rd
            files = real(obj, directory, name)
            files[0].write_bytes(files[0].read_bytes()[:10])  # the write got part of the way
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, directory, name)

    monkeypatch.setattr(state, "save_state", save_state)
    with pytest.raises(TrainingStopped, match=r"could not write checkpoint-2 .*disk is full") as e:
        pt(cfg(work, out))
    assert "checkpoint-1 is intact" in str(e.value)
    assert [p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".tmp"))] == ["checkpoint-1"]
    before = digest(out / "checkpoint-1")
    monkeypatch.setattr(state, "save_state", real)
    summary = pt(cfg(work, out, resume_from_checkpoint="true", max_steps=1 + 1))
    assert summary["log_history"][-1]["step"] == 2
    assert digest(out / "checkpoint-1") == before  # the resume read it and left it as it was


def test_disk_full_in_the_final_save(work, tmp_path, monkeypatch):
    import zhtune.train.outputs as outputs

    def full(*a, **kw):  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_json", full)
    out = tmp_path / "final"
    with pytest.raises(TrainingStopped, match=r"could not write the final outputs .*disk is full"):
        pt(cfg(work, out, max_steps=2))
    assert not (out / "adapter_config.json").exists() and not list(out.glob(".tmp-*"))
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


def make_checkpoints(run: Path, steps: list[int]) -> None:
    for s in steps:
        (run / f"checkpoint-{s}").mkdir(parents=True)
        (run / f"checkpoint-{s}" / "trainer_state.json").write_text("{}")


def names(run: Path) -> list[str]:
    return [p.name for _, p in guard.checkpoints(run)]


def test_rotation_sorts_by_step_and_never_deletes_the_newest_or_best(tmp_path):
    make_checkpoints(tmp_path, [2, 9, 10])  # "checkpoint-10" < "checkpoint-9" as text
    rotate(tmp_path, tmp_path / "checkpoint-10", 1)
    assert names(tmp_path) == ["checkpoint-10"]
    make_checkpoints(tmp_path, [3, 11])
    rotate(tmp_path, tmp_path / "checkpoint-11", 1, best=str(tmp_path / "checkpoint-3"))
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-11"]
    rotate(tmp_path, tmp_path / "checkpoint-11", 0)  # 0 or None: no limit
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-11"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_rolled_back_resume_keeps_its_own_checkpoint(tmp_path):
    """Resumed from checkpoint-2 while 4 and 6 (of the abandoned run) exist: once checkpoint-3 is written,
    a plain 'resume latest' must find 3, not the abandoned 6, and limit 1 must not delete 3."""
    make_checkpoints(tmp_path, [2, 3, 4, 6])
    rotate(tmp_path, tmp_path / "checkpoint-3", 1)
    assert names(tmp_path) == ["checkpoint-3"]


def test_save_total_limit_1_always_leaves_the_resume_checkpoint(work, tmp_path):
    """At every save of a limit-1 run and its resume, the checkpoint 'resume true' would pick is complete."""
    from zhtune.config.args import TrainArgs
    from zhtune.train.resume import resolve_resume

    seen = []

    class Check(TrainerCallback):
        def on_save(self, args, st, control, **kw):  # noqa: ANN001
            ck = resolve_resume(TrainArgs(output_dir=args.output_dir, resume_from_checkpoint="true"))
            seen.append(
                (
                    st.global_step,
                    Path(ck).name,
                    json.loads(Path(ck, "trainer_state.json").read_text())["global_step"],
                )
            )

    out = tmp_path / "limit1"
    pt(cfg(work, out, save_total_limit=1, max_steps=3), callbacks=[Check()])
    pt(
        cfg(
            work,
            out,
            save_total_limit=1,
            max_steps=5,
            resume_from_checkpoint="true",
            overwrite_output_dir=True,
        ),
        callbacks=[Check()],
    )
    assert seen == [(s, f"checkpoint-{s}", s) for s in range(1, 6)]
    assert names(out) == ["checkpoint-5"]
