"""A process that exits while a generation is still running exits cleanly: the engine closes at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_exit_with_a_generation_in_flight_is_clean(tiny_llama_sp):
    script = textwrap.dedent(
        f"""
        import threading, time
        from zhtune.config.args import GenerationArgs, ModelArgs
        from zhtune.infer.engine import Engine, EngineArgs

        engine = Engine.load(ModelArgs(model_name_or_path={str(tiny_llama_sp)!r}), EngineArgs())
        g = GenerationArgs(max_new_tokens=100000, temperature=0.0)
        job, pieces = engine.stream([{{"role": "user", "content": "hi"}}], g)
        next(pieces, None)  # the generation thread is inside model.generate now
        print("threads", sorted(t.name for t in threading.enumerate()), flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "zhtune-generate" in r.stdout, r.stdout + r.stderr  # the thread was running at exit
    assert r.returncode == 0, r.stderr[-2000:]
    assert "terminate called" not in r.stderr
