"""The loss-curve PNG is written at the end and after evaluations, and while training at most every every_s."""

from __future__ import annotations

from types import SimpleNamespace

from zhtune.train.callbacks import LossCurveCallback


def test_loss_curve_is_drawn_at_the_end_after_evals_and_then_by_time(tmp_path):
    png = tmp_path / "loss_curve.png"
    state = SimpleNamespace(is_world_process_zero=True, log_history=[{"step": 1, "loss": 3.0}])
    cb = LossCurveCallback(png, every_s=3600)
    cb.on_train_begin(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 3.0})
    assert not png.exists()  # a training log within the hour: not drawn
    state.log_history.append({"step": 1, "eval_loss": 2.5})
    cb.on_log(None, state, None, logs={"eval_loss": 2.5})
    assert png.is_file()  # an evaluation: drawn
    png.unlink()
    cb.on_train_end(None, state, None)
    assert png.read_bytes().startswith(b"\x89PNG")  # the end: drawn
    png.unlink()
    fast = LossCurveCallback(png, every_s=0)
    fast.on_log(None, state, None, logs={"loss": 3.0})
    assert png.is_file()
    png.unlink()
    state.is_world_process_zero = False  # other ranks never draw
    fast.on_train_end(None, state, None)
    assert not png.exists()
