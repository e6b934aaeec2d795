"""chat, generate and serve on the embedded default model (SmolLM2-135M-Instruct), with the openai client
and a real browser. Slow: the model is real and runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from infer_models import running_server

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[1] / "src")
QUESTION = "What is 2+2? Answer with one short sentence."


@pytest.fixture(scope="module")
def default_dir():
    from zhtune.errors import MissingDependency
    from zhtune.model.default import default_model_dir

    try:
        return default_model_dir()
    except MissingDependency as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def served(default_dir):
    pytest.importorskip("fastapi")
    with running_server({"model_name_or_path": "default", "max_batch_size": 4}) as (url, app):
        yield url, app


def test_openai_client_on_the_default_model(served):
    openai = pytest.importorskip("openai")
    url, app = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    assert model == "default"
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0)
    text = r.choices[0].message.content
    # the instruct model ends its turn with <|im_end|>: the reply stops well before max_tokens
    assert "4" in text and r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40
    assert r.usage.prompt_tokens == len(app.state.server.engine.prompt_ids(msgs))
    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=40, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "stop"
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in c.choices[0].text and c.usage.completion_tokens <= 8


def test_page_on_the_default_model(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_serve_browser import ARTIFACTS, browser

    url, _ = served
    with sync_api.sync_playwright() as p:
        ctx = browser(p, tmp_path / "profile")
        try:
            page = ctx.new_page()
            page.goto(url + "/")
            page.wait_for_function("() => document.getElementById('model').textContent === 'default'")
            page.click("#settings-panel summary")
            page.fill("#max_tokens", "24")
            page.fill("#input", "你好！请用一句话介绍你自己。")
            page.press("#input", "Enter")
            page.wait_for_function("() => document.getElementById('stop').disabled === false")
            page.wait_for_function("() => document.getElementById('stop').disabled", timeout=300_000)
            reply = page.locator(".msg.assistant").last.text_content()
            assert "finish:" in reply and len(reply.split("finish:")[0].strip()) > 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_page_default.png"))
        finally:
            ctx.close()


def test_chat_and_generate_commands_on_the_default_model(default_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "zhtune",
            "chat",
            "--prompt",
            QUESTION,
            "--temperature",
            "0",
            "--repetition_penalty",
            "1.0",
            "--max_new_tokens",
            "40",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "4" in p.stdout and "[cut at" not in p.stdout  # it answered and stopped by itself

    src = tmp_path / "prompts.jsonl"
    src.write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False) for r in [{"prompt": QUESTION}, {"prompt": "Say hello."}]
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "zhtune",
        "generate",
        "--input_file",
        str(src),
        "--output_file",
        str(out),
        "--temperature",
        "0",
        "--repetition_penalty",
        "1.0",
        "--max_new_tokens",
        "40",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"] and all(r["finish_reason"] == "stop" for r in rows)
    assert "4" in rows[0]["output"]


def test_a_gguf_file_loads_directly(default_dir):
    from zhtune.config.args import GenerationArgs, ModelArgs
    from zhtune.infer.engine import Engine
    from zhtune.model.default import locate_default_gguf

    engine = Engine.load(ModelArgs(model_name_or_path=str(locate_default_gguf())))
    engine.start("generate")
    try:
        r = engine.chat(
            [{"role": "user", "content": QUESTION}],
            GenerationArgs(max_new_tokens=40, temperature=0, repetition_penalty=1.0),
        )
    finally:
        engine.close()
    assert "4" in r.text and r.finish_reason == "stop"
