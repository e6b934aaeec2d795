"""zhtune data generate end to end over HTTP: a loopback OpenAI-compatible stub, then zhtune serve (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_stub import StubServer

from zhtune.cli import main as zhtune

REPO = Path(__file__).resolve().parents[1]


def gen_args(base_url, out, n, *extra):
    return [
        "data", "generate", "--api_base", base_url, "--api_key", "test", "--model", "stub",
        "--out_file", str(out), "--num_samples", str(n), "--retry_backoff", "0.01", *extra,
    ]  # fmt: skip


def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_generate_through_the_cli_retries_and_accounts(tmp_path):
    out, rep = tmp_path / "gen.jsonl", tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with StubServer(fail=[429, 500, 503], tasks_per_reply=4) as stub:
        args = gen_args(stub.base_url, out, 10, "--tasks_per_request", "4", "--max_concurrency", "2")
        args += ["--price_prompt_per_1k", "0.5", "--price_completion_per_1k", "2", "--report_file", str(rep)]
        p = subprocess.run(
            [sys.executable, "-m", "zhtune", *args], capture_output=True, text=True, env=env, timeout=120
        )
        assert p.returncode == 0, p.stderr
        totals = dict(stub.state.usage_totals)
        served = stub.state.served
    r = json.loads(rep.read_text())
    assert r["retries"] == {"429": 1, "500": 1, "503": 1} and r["failed_requests"] == 0
    assert r["requests"] == served  # every reply the stub sent was counted once
    assert (
        r["prompt_tokens"] == totals["prompt_tokens"]
        and r["completion_tokens"] == totals["completion_tokens"]
    )
    assert r["cost"] == pytest.approx(
        totals["prompt_tokens"] / 1000 * 0.5 + totals["completion_tokens"] / 1000 * 2
    )
    tasks = lines(out)
    assert len(tasks) == 10 == r["kept"]
    assert len({t["instruction"] for t in tasks}) == 10
    assert all(set(t) == {"instruction", "input", "output"} and t["output"] for t in tasks)
    assert not any("作为一个AI语言模型" in t["output"] for t in tasks)
    # each reply plants one near duplicate and one refusal; those that were judged were dropped
    assert r["dropped"].get("near duplicate", 0) >= 1 and r["dropped"].get("refusal or boilerplate", 0) >= 1
    assert "tasks kept" in p.stdout and "429 1" in p.stdout


def test_generate_resumes_and_appends_only_what_is_missing(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    with StubServer(tasks_per_reply=3) as stub:
        assert zhtune(gen_args(stub.base_url, out, 5, "--tasks_per_request", "3")) == 0
        first = lines(out)
        assert len(first) == 5
        n = stub.state.requests
        assert zhtune(gen_args(stub.base_url, out, 5)) == 0  # nothing missing: no request at all
        assert stub.state.requests == n and "nothing to do" in capsys.readouterr().out
        with open(out, "a", encoding="utf-8") as f:  # a run killed in the middle of a line
            f.write('{"instruction": "半行')
        assert zhtune(gen_args(stub.base_url, out, 8, "--tasks_per_request", "3")) == 0
    got = lines(out)
    assert got[:5] == first and len(got) == 8  # the torn line was cut, the old tasks untouched
    assert len({t["instruction"] for t in got}) == 8


def test_generate_filters_near_duplicates_of_existing_data(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    with StubServer(tasks_per_reply=3) as stub:
        assert zhtune(gen_args(stub.base_url, out, 3, "--tasks_per_request", "3")) == 0
        stub.state.topic = 0  # the stub starts over: every task it writes now exists already
        rc = zhtune(gen_args(stub.base_url, out, 4, "--tasks_per_request", "3", "--max_requests", "1"))
    assert rc == 1  # too few new tasks: says so and exits non-zero, so a script can run it again
    printed = capsys.readouterr().out
    assert "near duplicate" in printed and "run again to resume" in printed
    assert len(lines(out)) == 3


def test_generate_two_step_mode(tmp_path):
    out = tmp_path / "gen.jsonl"
    with StubServer() as stub:
        assert zhtune(gen_args(stub.base_url, out, 3, "--mode", "two_step")) == 0
        assert stub.state.served == 6  # one instruction and one answer per task
    tasks = lines(out)
    assert len(tasks) == 3 and all(t["instruction"].startswith("请介绍一下") and t["output"] for t in tasks)


def test_generate_gives_up_after_retries_and_says_so(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    with StubServer(fail=[500] * 6) as stub:
        rc = zhtune(
            gen_args(
                stub.base_url, out, 2, "--max_retries", "2", "--max_requests", "2", "--max_concurrency", "1"
            )
        )
        assert stub.state.requests == 6  # 2 requests x (1 try + 2 retries)
    assert rc == 1
    assert "2 failed after retries" in capsys.readouterr().out


def test_generate_stops_on_a_client_error(tmp_path, capsys):
    with StubServer() as stub:
        rc = zhtune(gen_args(stub.base_url.replace("/v1", "/nope"), tmp_path / "g.jsonl", 2))
    assert rc == 2
    assert "answered 404" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("zhtune.serve") is None, reason="zhtune serve is not in this checkout yet"
)
def test_generate_against_zhtune_serve_then_train(tmp_path):
    """The whole offline loop: serve the embedded default model, generate from it, train on the result."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "zhtune", "serve", "--model_name_or_path", "default", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        import urllib.request

        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(base + "/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "zhtune serve did not come up in 240 s"
                time.sleep(1)
        out, rep = tmp_path / "gen.jsonl", tmp_path / "r.json"
        args = ["data", "generate", "--api_base", base, "--model", "default", "--out_file", str(out)]
        args += ["--num_samples", "2", "--mode", "two_step", "--max_tokens", "32", "--max_concurrency", "2"]
        args += ["--report_file", str(rep), "--similarity_threshold", "1", "--max_requests", "8"]
        args += ["--request_timeout", "300"]
        assert zhtune(args) == 0
        r = json.loads(rep.read_text())
        assert r["kept"] == 2 and r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    run = tmp_path / "sft"
    sft = ["sft", "--model_name_or_path", "default", "--train_files", str(out), "--output_dir", str(run)]
    assert (
        zhtune([*sft, "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none"]) == 0
    )
    assert (run / "adapter_config.json").is_file()


def test_parse_tasks_reads_json_scattered_objects_and_labelled_blocks():
    from zhtune.data.generate_prompt import first_line, parse_tasks

    arr = '好的：\n```json\n[{"instruction": "写诗", "input": "", "output": "春眠不觉晓"}, {"指令": "翻译", "输入": "你好", "输出": "Hello"}]\n```'
    assert parse_tasks(arr) == [
        {"instruction": "写诗", "input": "", "output": "春眠不觉晓"},
        {"instruction": "翻译", "input": "你好", "output": "Hello"},
    ]
    loose = '1. {"instruction": "a", "output": "b"}\n2. {"instruction": "c", "input": 3, "output": "d"} 完'
    assert parse_tasks(loose) == [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "c", "input": "3", "output": "d"},
    ]
    blocks = "1. 指令：写一句问候语\n输出：你好！\n2. 指令：把数字相加\n输入：1 和 2\n输出：3"
    assert parse_tasks(blocks) == [
        {"instruction": "写一句问候语", "input": "", "output": "你好！"},
        {"instruction": "把数字相加", "input": "1 和 2", "output": "3"},
    ]
    assert parse_tasks("no tasks here") == []
    assert first_line('\n  1. "介绍一下长城。"\n其他') == "介绍一下长城。"
