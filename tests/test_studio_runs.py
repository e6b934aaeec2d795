"""The studio's runs: the real ``zhtune`` command in its own process group, read back from its files.

On a tiny model: a run finishes and a new studio (as after a restart) sees it; a run that fails shows the
command's one-line error; a run stopped mid-way resumes from its newest checkpoint. The log reader is
checked on a hand-written log with carriage-return progress bars, attempts and a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import CORPUS, write_alpaca

from zhtune.errors import ConfigError
from zhtune.studio.progress import LogReader
from zhtune.studio.runs import RunManager
from zhtune.studio.workspace import Workspace

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from zhtune.studio.app import create_app  # noqa: E402
from zhtune.studio.compare import table  # noqa: E402
from zhtune.studio.context import start  # noqa: E402
from zhtune.studio.routes import details  # noqa: E402
from zhtune.studio.server import StudioArgs, make_studio  # noqa: E402


def bar(n: int, total: int) -> str:
    return f"\r{100 * n // total:3d}%|##        | {n}/{total} [00:0{n}<00:0{total - n},  1.00s/it]"


def test_the_log_reader_ties_each_loss_to_its_step_and_keeps_the_newest_attempt():
    log = "[studio] attempt 1 started 2026-01-01 00:00:00: python -m zhtune sft r.yaml\nSFT data:\n"
    log += bar(0, 4) + bar(1, 4) + "\r      \r{'loss': '2.5', 'grad_norm': '1', 'epoch': '0.1'}\n" + bar(1, 4)
    log += bar(2, 4) + "\r      \r{'loss': '2.25', 'epoch': '0.2'}\n" + bar(2, 4) + "\n"
    log += "\n[studio] attempt 1 stopped after 3 s\n"
    log += "[studio] attempt 2 started 2026-01-01 00:00:09: python -m zhtune sft r.yaml --resume_from_checkpoint auto\n"
    log += bar(0, 4) + bar(3, 4) + "\r   \r{'loss': '2.0', 'epoch': '0.3'}\n" + bar(3, 4)
    log += (
        bar(4, 4)
        + "\r  \r{'loss': '1.75'}\n"
        + bar(4, 4)
        + "\r  \r{'train_runtime': '9', 'train_loss': '2.1'}\n"
    )
    log += bar(4, 4) + "\ndone: train_loss 2.1000; outputs in runs/r/out\n"
    reader = LogReader()
    for i in range(0, len(log), 7):  # arrives in small pieces, cut anywhere
        reader.feed(log[i : i + 7])
    assert [(p["step"], p["value"]) for p in reader.loss_points()] == [
        (1, 2.5),
        (2, 2.25),
        (3, 2.0),
        (4, 1.75),
    ]
    assert reader.progress["step"] == 4 and reader.progress["total"] == 4 and reader.progress["eta"] == 0
    assert reader.first_step == {1: 1, 2: 3} and reader.attempt == 2
    assert reader.summary == {"train_runtime": "9", "train_loss": "2.1"}
    assert "SFT data:" in reader.lines and not any("%|" in x for x in reader.lines)
    assert reader.error() == "done: train_loss 2.1000; outputs in runs/r/out"


def test_the_log_reader_finds_the_error_line_or_the_end_of_a_traceback():
    r = LogReader()
    r.feed("[zhtune] chat template: alpaca\nzhtune sft: data/bad.jsonl:3: malformed JSON (Expecting value)\n")
    assert r.error() == "zhtune sft: data/bad.jsonl:3: malformed JSON (Expecting value)"
    r = LogReader()
    r.feed(
        'Traceback (most recent call last):\n  File "x.py", line 1\n    boom()\nRuntimeError: CUDA out of memory\n'
    )
    r.feed("\n[studio] attempt 1 failed with exit status 1 after 3 s\n")
    assert r.error() == "RuntimeError: CUDA out of memory"


@pytest.fixture
def studio(tmp_path, tiny_llama_bpe):
    root = tmp_path / "ws"
    shutil.copytree(tiny_llama_bpe, root / "models" / "tiny")
    (root / "data").mkdir(parents=True)
    write_alpaca(root / "data" / "alpaca.json", n=32)
    (root / "data" / "heldout.txt").write_text("\n".join(CORPUS[:12]) + "\n", encoding="utf-8")
    s = make_studio(StudioArgs(workspace=str(root)), None)
    yield s
    for name in s.runs.names():  # never leave a run behind
        if s.runs.status(name)["state"] == "running":
            s.runs.stop(name)
            wait(s.runs, name, ("stopped", "failed", "finished"))


def sft_values(**train: str) -> dict:
    return {
        "model": {"model_name_or_path": "models/tiny"},
        "data": {"train_files": "data/alpaca.json", "max_seq_length": "48"},
        "train": {"per_device_train_batch_size": "2", "logging_steps": "1", "report_to": "none", **train},
    }


def wait(runs: RunManager, name: str, states: tuple[str, ...], timeout: float = 600) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = runs.status(name)
        if st["state"] in states:
            return st
        time.sleep(0.05)
    raise AssertionError(f"run {name} still {runs.status(name)['state']} after {timeout} s")


def read_log(runs: RunManager, name: str) -> LogReader:
    reader = LogReader()
    reader.feed(runs.log_path(name).read_bytes().decode("utf-8", errors="replace"))  # carriage returns kept
    return reader


def test_a_run_is_the_real_command_in_its_own_group_and_outlives_its_studio(studio):
    st = start(studio, "first", "sft", sft_values(max_steps="3"))
    assert st["state"] == "running" and st["display"] == "zhtune sft runs/first/recipe.yaml"
    assert "--max_steps 3" in st["command_line"] and "--output_dir runs/first/out" in st["command_line"]
    pid = studio.runs.record("first")["attempts"][0]["pid"]
    assert os.getpgid(pid) == pid != os.getpgid(0)  # its own process group: closing the studio leaves it
    later = RunManager(Workspace(studio.ws.root))  # a studio started afresh reads the same run back
    assert later.names() == ["first"] and later.status("first")["state"] in ("running", "finished")
    st = wait(later, "first", ("finished", "failed"))
    assert st["state"] == "finished" and st["rc"] == 0, read_log(later, "first").error()
    out = studio.ws.root / "runs" / "first" / "out"
    assert (out / "adapter_config.json").is_file() and (out / "loss_curve.png").is_file()
    reader = read_log(later, "first")
    assert [p["step"] for p in reader.loss_points()] == [1, 2, 3]
    history = json.loads((out / "log_history.json").read_text())
    assert [round(h["loss"], 3) for h in history if "loss" in h] == [
        round(p["value"], 3) for p in reader.loss_points()
    ]
    info = details(studio, "first")
    assert info["model"] == {"model": "models/tiny", "adapters": ["runs/first/out"]}
    assert info["plots"] == ["runs/first/out/loss_curve.png"] and "max_steps: 3" in info["recipe"]
    with pytest.raises(ConfigError, match="already exists"):
        start(studio, "first", "sft", sft_values(max_steps="3"))
    with pytest.raises(ConfigError, match="finished; there is nothing to resume"):
        studio.runs.resume("first")


def test_a_failing_run_shows_its_error(studio):
    bad = studio.ws.root / "data" / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', encoding="utf-8")
    values = sft_values(max_steps="2")
    values["data"]["train_files"] = "data/bad.jsonl"
    start(studio, "broken", "sft", values)
    st = wait(studio.runs, "broken", ("finished", "failed"))
    assert st["state"] == "failed" and st["rc"] == 2
    info = details(studio, "broken")
    assert info["error"].startswith("zhtune sft: ") and "bad.jsonl:2: malformed JSON" in info["error"]
    assert info["model"] is None


def test_a_stopped_run_resumes_from_its_newest_checkpoint(studio):
    start(studio, "long", "sft", sft_values(max_steps="16", save_steps="1", save_total_limit="2"))
    out = studio.ws.root / "runs" / "long" / "out"
    t0 = time.time()
    while not any((c / "trainer_state.json").is_file() for c in out.glob("checkpoint-*")):
        assert studio.runs.status("long")["state"] == "running", read_log(studio.runs, "long").error()
        assert time.time() - t0 < 600
        time.sleep(0.05)
    studio.runs.stop("long")
    st = wait(studio.runs, "long", ("stopped", "finished", "failed"))
    assert st["state"] == "stopped", f"the run ended as {st['state']} before it could be stopped"
    assert not (out / "adapter_config.json").exists()
    saved = max(
        int(c.name.split("-")[1]) for c in out.glob("checkpoint-*") if (c / "trainer_state.json").is_file()
    )
    with pytest.raises(ConfigError, match="is not running"):
        studio.runs.stop("long")
    st = studio.runs.resume("long")
    assert st["attempts"] == 2 and st["state"] == "running"
    st = wait(studio.runs, "long", ("finished", "failed", "stopped"))
    reader = read_log(studio.runs, "long")
    assert st["state"] == "finished", reader.error()
    assert "--resume_from_checkpoint auto" in Path(studio.runs.log_path("long")).read_text()
    assert reader.first_step[2] == saved + 1 >= 2  # the second attempt goes on from the checkpoint
    assert {p["step"] for p in reader.loss_points()} == set(range(1, 17))
    history = json.loads((out / "log_history.json").read_text())
    assert max(h["step"] for h in history) == 16


def test_merge_export_and_chat_on_a_finished_run(studio):
    start(studio, "base", "sft", sft_values(max_steps="2"))
    assert wait(studio.runs, "base", ("finished", "failed"))["state"] == "finished"
    c = TestClient(create_app(studio), base_url="http://127.0.0.1:7860")
    h = {"X-Zhtune-Studio": "1"}
    r = c.post("/api/runs/base/merge", json={}, headers=h)
    assert r.status_code == 200 and r.json()["name"] == "base-merged", r.text
    assert r.json()["command_line"] == (
        "zhtune merge --model_name_or_path models/tiny --lora_models runs/base/out --output_dir runs/base-merged/out"
    )
    st = wait(studio.runs, "base-merged", ("finished", "failed"))
    assert st["state"] == "finished", read_log(studio.runs, "base-merged").error()
    assert (studio.ws.root / "runs" / "base-merged" / "out" / "config.json").is_file()
    r = c.post("/api/runs/base-merged/merge", json={}, headers=h)
    assert r.status_code == 400 and "no adapters to merge" in r.json()["error"]
    r = c.post("/api/runs/base-merged/export", json={"quant": "q8_0"}, headers=h)
    assert r.status_code == 200 and r.json()["name"] == "base-merged-gguf-q8_0", r.text
    st = wait(studio.runs, "base-merged-gguf-q8_0", ("finished", "failed"))
    assert st["state"] == "finished", read_log(studio.runs, "base-merged-gguf-q8_0").error()
    ggufs = list((studio.ws.root / "runs" / "base-merged-gguf-q8_0" / "out").glob("*.gguf"))
    assert len(ggufs) == 1 and ggufs[0].stat().st_size > 10_000
    assert c.get("/api/runs/base-merged-gguf-q8_0").json()["parent"] == "base-merged"
    r = c.post("/api/runs/base-merged/export", json={"quant": "q3_k"}, headers=h)
    assert r.status_code == 400 and "--quant must be one of" in r.json()["error"]

    assert c.post("/api/runs/base/chat", headers=h).json()["state"] == "loading"
    t0 = time.time()
    while (state := c.get("/api/runs/base/chat").json())["state"] == "loading":
        assert time.time() - t0 < 300
        time.sleep(0.5)
    assert state["state"] == "ready", state
    ask = {"messages": [{"role": "user", "content": "你好"}], "stream": True, "max_tokens": 400}
    with c.stream("POST", "/api/runs/base/chat/completions", json=ask, headers=h) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["model"] == "base"
    server = studio.chats.get("base")  # the page left mid-reply: the generation is cancelled
    t0 = time.time()
    while server_health(server.port)["cancelled"] < 1:
        assert time.time() - t0 < 60
        time.sleep(0.2)
    r = c.post("/api/runs/base/chat/completions", json={**ask, "max_tokens": 0}, headers=h)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]
    r = c.post("/api/runs/base/chat/completions", json={**ask, "n": 5}, headers=h)
    assert r.status_code == 400 and "messages and" in r.json()["error"]
    key = (studio.ws.private / "chat-base.key").read_text()
    assert os.stat(studio.ws.private / "chat-base.key").st_mode & 0o777 == 0o600
    assert key not in (studio.ws.run_dir("base") / "chat.log").read_text(encoding="utf-8", errors="replace")
    assert c.delete("/api/runs/base/chat", headers=h).json() == {"state": "closed"}
    assert not (studio.ws.private / "chat-base.key").exists() and server.proc.poll() is not None


def server_health(port: int) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())


PIPELINE = """
- name: sft
  command: sft
  with: {train_files: [data/alpaca.json], max_seq_length: 48, max_steps: 2, logging_steps: 1,
         per_device_train_batch_size: 2, report_to: none}
- name: eval
  command: eval
  with: {text_files: [data/heldout.txt], max_seq_length: 64}
"""


def test_a_pipeline_run_shows_its_stages_report_and_eval(studio):
    values = {
        "pipeline": {
            "model_name_or_path": "models/tiny",
            "stages": PIPELINE,
            "variants": "quick: {run_dir: elsewhere}",
        }
    }
    st = start(studio, "pipe", "pipeline", values)
    recipe = (studio.ws.root / "runs" / "pipe" / "recipe.yaml").read_text()
    assert "run_dir: runs/pipe/out" in recipe and "elsewhere" not in recipe  # variants write there too
    st = wait(studio.runs, "pipe", ("finished", "failed"))
    reader = read_log(studio.runs, "pipe")
    assert st["state"] == "finished", reader.error()
    assert [(p["stage"], p["step"]) for p in reader.loss_points()] == [("sft", 1), ("sft", 2)]
    info = details(studio, "pipe")
    assert (
        "# Pipeline report: out" in info["report"] and "runs/pipe/out/report/loss_curves.png" in info["plots"]
    )
    assert info["model"] == {"model": "models/tiny", "adapters": ["runs/pipe/out/sft"]}
    result = table({"pipe": studio.ws.root / "runs" / "pipe" / "out"})
    assert result["columns"] == ["pipe/eval/base", "pipe/eval/sft"]
    bpc = next(r for r in result["rows"] if r["metric"] == "bits/char")
    assert bpc["task"] == "heldout" and all(float(x) > 0 for x in bpc["cells"])


def test_preference_tuning_runs_from_the_page_on_an_sft_run(studio):
    """SFT, then DPO (sigmoid loss) continuing its adapter, both started as the page starts them: the DPO run
    is the real ``zhtune dpo``, its log shows the loss and reward margins, and its output is the aligned
    adapter that merge and chat open."""
    from pref_helpers import write_pairs

    write_pairs(studio.ws.root / "data" / "pairs.jsonl", n=6)
    start(studio, "sft", "sft", sft_values(max_steps="2"))
    assert wait(studio.runs, "sft", ("finished", "failed"))["state"] == "finished"
    values = {
        "model": {"model_name_or_path": "models/tiny"},
        "data": {"train_files": "data/pairs.jsonl", "max_seq_length": "64"},
        "lora": {"peft_path": "runs/sft/out"},
        "pref": {"loss": "dpo", "beta": "0.1"},
        "train": {
            "per_device_train_batch_size": "2",
            "logging_steps": "1",
            "report_to": "none",
            "max_steps": "2",
        },
    }
    st = start(studio, "aligned", "dpo", values)
    assert (
        st["display"] == "zhtune dpo runs/aligned/recipe.yaml"
        and "--peft_path runs/sft/out" in st["command_line"]
    )
    st = wait(studio.runs, "aligned", ("finished", "failed"))
    assert st["state"] == "finished", read_log(studio.runs, "aligned").error()
    reader = read_log(studio.runs, "aligned")
    assert [p["step"] for p in reader.loss_points()] == [1, 2]
    log = studio.runs.log_path("aligned").read_text(encoding="utf-8", errors="replace")
    assert log.count("'rewards/margins'") >= 2  # logged every step, beside the loss
    out = studio.ws.root / "runs" / "aligned" / "out"
    assert (out / "adapter_config.json").is_file() and (out / "loss_curve.png").is_file()
    assert details(studio, "aligned")["model"] == {"model": "models/tiny", "adapters": ["runs/aligned/out"]}
    with pytest.raises(ConfigError, match="loss"):
        start(studio, "bad", "dpo", {**values, "pref": {"loss": "nope"}})
