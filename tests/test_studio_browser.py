"""The studio page in a real headless Chromium (Debian's), driven by Playwright as a person would use it.

``zhtune studio`` runs as its own process on a workspace holding a tiny model and an Alpaca file. The page
picks the model and the file, uploads a second file, shows the preview (formats, token-length histogram,
supervised spans), starts a 4-step SFT, shows the loss curve growing while it runs and the run finishing,
opens chat on the adapter and streams a reply, then compares an eval of base and tuned model. Screenshots
of each page go to ``test-artifacts/`` (``ZHTUNE_ARTIFACTS`` overrides the folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CORPUS, write_alpaca

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("ZHTUNE_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
SHAREGPT = '{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"}]}\n'


@pytest.fixture
def studio_url(tmp_path, tiny_llama_bpe):
    from zhtune.studio.chat import free_port
    from zhtune.studio.runs import child_env

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (run: make browser-deps)")
    ws = tmp_path / "ws"
    shutil.copytree(tiny_llama_bpe, ws / "models" / "tiny")
    (ws / "data").mkdir()
    write_alpaca(ws / "data" / "alpaca.json", n=24)
    (ws / "data" / "heldout.txt").write_text("\n".join(CORPUS[:20]) + "\n", encoding="utf-8")
    (tmp_path / "chat.jsonl").write_text(SHAREGPT, encoding="utf-8")
    port = free_port()
    argv = [sys.executable, "-m", "zhtune", "studio", "--workspace", str(ws), "--port", str(port)]
    env = {**child_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # tokenized sets: not the user's cache
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"zhtune studio did not start: {proc.stdout.read()}")
            time.sleep(0.3)
    try:
        yield url, ws, tmp_path
    finally:
        proc.terminate()  # ends the chat server with it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    key = ws / ".studio" / "chat-tiny-sft.key"
    assert not key.exists() and not processes_naming(str(key)), "the chat server outlived the studio"


def processes_naming(text: str) -> list[int]:
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (p / "cmdline").read_bytes():
                found.append(int(p.name))
        except OSError:
            continue
    return found


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"studio_{name}.png"))


def new_run(page, tmp_path: Path) -> None:
    page.wait_for_selector("#f-model-model_name_or_path")
    assert page.input_value("#command") == "sft"
    page.fill("#f-model-model_name_or_path", "models/tiny")
    page.check("#data-files input[value='data/alpaca.json']")
    assert page.input_value("#f-data-train_files") == "data/alpaca.json"
    page.set_input_files("#upload", str(tmp_path / "chat.jsonl"))  # an upload shows up in the list
    page.wait_for_selector("#data-files input[value='data/chat.jsonl']")
    page.check("#data-files input[value='data/chat.jsonl']")
    page.fill("#f-data-max_seq_length", "48")
    page.click("#preview-btn")
    page.wait_for_selector("#preview-summary", timeout=120_000)
    summary = page.text_content("#preview-summary")
    assert "25 条记录 / records" in summary and "over 48" in summary, summary
    formats = page.text_content("#preview-files")
    assert "alpaca 24" in formats and "sharegpt 1" in formats
    assert page.locator("#histogram rect").count() >= 2
    supervised = page.locator(".sample .seg.sup")
    assert supervised.count() >= 3 and page.locator(".sample .seg.tpl").count() >= 3
    assert "<|im_end|>" in supervised.first.text_content()  # the end-of-turn token is learned too
    for name, value in (("max_steps", "4"), ("logging_steps", "1"), ("per_device_train_batch_size", "2")):
        page.fill(f"#f-train-{name}", value)
    page.fill("#f-train-report_to", "none")
    page.select_option("#method", "1")  # QLoRA: LoRA on a 4-bit base
    assert page.is_checked("#f-model-load_in_4bit") and page.input_value("#f-lora-finetuning_type") == "lora"
    page.select_option("#method", "0")  # back to plain LoRA (4-bit needs CUDA)
    assert not page.is_checked("#f-model-load_in_4bit")
    page.fill("#run-name", "tiny-sft")
    page.click("#show-command")
    page.wait_for_selector("#command-line:not([hidden])")
    line = page.text_content("#command-line")
    assert line.startswith("zhtune sft --model_name_or_path models/tiny") and "--max_steps 4" in line
    assert "--output_dir runs/tiny-sft/out" in line and "max_steps: 4" in page.text_content("#yaml")
    page.fill("#filter", "steps")  # the options whose name or help mention steps
    visible = page.locator("#form .field:visible")
    assert 5 <= visible.count() < 20 and all("step" in t.lower() for t in visible.all_text_contents())
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "new_run")
    page.fill("#filter", "")


def watch_run(page) -> None:
    page.click("#start")
    page.wait_for_selector("#tab-runs:not([hidden])")
    page.wait_for_function("() => document.getElementById('run-state').textContent === 'running'")
    points = "() => Math.max(0, ...[...document.querySelectorAll('#loss-chart .loss-line')].map(l => +l.dataset.points))"
    page.wait_for_function(f"{points} >= 1", timeout=300_000)
    first = page.evaluate(points)
    if first < 4:  # the curve grows while it runs (4 tiny steps can all land before the first look)
        page.wait_for_function(f"{points} > {first}", timeout=300_000)
    page.wait_for_function(
        "() => document.getElementById('run-state').textContent === 'finished'", timeout=600_000
    )
    page.wait_for_function(f"{points} === 4")
    assert "4/4" in page.text_content("#progress-text")
    assert "done: train_loss" in page.text_content("#log")
    page.wait_for_function("() => !document.getElementById('open-chat').disabled")
    page.wait_for_selector("#loss-png:not([hidden])")
    shot(page, "runs")


def chat(page, ws: Path) -> None:
    page.click("#open-chat")
    page.wait_for_selector("#tab-chat:not([hidden])")
    page.wait_for_function(
        "() => document.getElementById('chat-state').textContent.includes('ready')", timeout=300_000
    )
    page.fill("#chat-input", "你好，请介绍一下北京。")
    page.click("#chat-send")
    done = "() => { const b = document.querySelector('.msg.assistant'); return b && b.dataset.content !== undefined; }"
    page.wait_for_function(done, timeout=120_000)
    reply = page.locator(".msg.assistant").last.text_content()
    assert reply, "no reply streamed"
    assert page.locator(".msg.user").first.text_content() == "你好，请介绍一下北京。"
    key = (ws / ".studio" / "chat-tiny-sft.key").read_text()
    assert len(key) >= 24 and key not in page.content()
    for log in (ws / "runs" / "tiny-sft").glob("*.log"):
        assert key not in log.read_text(encoding="utf-8", errors="replace"), log
    shot(page, "chat")


def compare(page) -> None:
    page.click("#nav-new")
    page.select_option("#command", "eval")
    page.wait_for_selector("#f-eval-compare")
    page.fill("#f-eval-compare", "base=models/tiny,tuned=models/tiny+runs/tiny-sft/out")
    page.fill("#f-eval-text_files", "data/heldout.txt")
    page.fill("#f-eval-max_seq_length", "64")
    page.fill("#run-name", "tiny-eval")
    page.click("#start")
    page.wait_for_function("() => document.getElementById('run-title').textContent === 'tiny-eval'")
    page.wait_for_function(
        "() => document.getElementById('run-state').textContent === 'finished'", timeout=600_000
    )
    page.click("#nav-compare")
    page.wait_for_selector("#compare-runs input[value='tiny-eval']")
    page.check("#compare-runs input[value='tiny-eval']")
    page.click("#compare-btn")
    page.wait_for_selector("#compare-table tr:nth-child(2)")
    head = page.text_content("#compare-table tr")
    assert "tiny-eval/base" in head and "tiny-eval/tuned" in head
    assert "bits/char" in page.text_content("#compare-table")
    shot(page, "compare")


def test_prepare_train_watch_chat_and_compare_in_the_browser(studio_url):
    url, ws, tmp_path = studio_url
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            new_run(page, tmp_path)
            watch_run(page)
            chat(page, ws)
            compare(page)
            assert not errors, errors
        finally:
            ctx.close()
    assert (ws / "runs" / "tiny-sft" / "out" / "adapter_config.json").is_file()
    for name in ("new_run", "runs", "chat", "compare"):
        assert (ARTIFACTS / f"studio_{name}.png").stat().st_size > 10_000
