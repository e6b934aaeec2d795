"""The web chat page in a real headless Chromium (Debian's), driven by Playwright without its own browsers.

Needs ``/usr/bin/chromium`` (``make browser-deps`` installs it) and the ``playwright`` package. The screenshot
is kept as a test artifact in ``test-artifacts/`` (``ZHTUNE_ARTIFACTS`` overrides the folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from infer_models import never_stopping_model, running_server

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("ZHTUNE_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, bpe_tokenizer_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (run: make browser-deps)")
    model = never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("looping_page"), context=4096)
    cfg = {"model_name_or_path": str(model), "served_model_name": "tiny", "api_key": "sk-page-test"}
    with running_server(cfg) as (url, app):
        yield url, app


def browser(p, profile: Path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (run: make browser-deps)")
    return p.chromium.launch_persistent_context(
        user_data_dir=str(profile),  # a fresh profile, passed as --user-data-dir
        executable_path=CHROMIUM,
        headless=True,
        args=FLAGS,
    )


def test_page_chats_in_chinese_with_streaming(served, tmp_path):
    url, app = served
    with sync_api.sync_playwright() as p:
        ctx = browser(p, tmp_path / "profile")
        try:
            page = ctx.new_page()
            page.goto(url + "/")
            # the server wants a key: the page says so until one is entered in the settings
            page.wait_for_function("() => document.getElementById('model').textContent.includes('API key')")
            page.fill("#apikey", "sk-page-test")
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "200")
            page.fill("#input", "你好，请用中文介绍一下北京。")
            page.click("#send")
            bubble = page.locator(".msg.assistant").last
            # streamed: text shows up while the request is still running (the Stop button is live)
            page.wait_for_function(
                "() => document.querySelector('.msg.assistant').textContent.length >= 3"
                " && !document.getElementById('stop').disabled"
            )
            partial = bubble.text_content()
            page.wait_for_function("() => document.getElementById('stop').disabled", timeout=120_000)
            final = bubble.text_content()
            reply = final.split("finish:")[0]
            assert len(reply) == 200 and set(reply) <= set("好的") and len(partial) < len(final)
            assert "finish: length" in final and "200 tokens" in final
            page.locator(".msg.user").first.wait_for()
            assert page.locator(".msg.user").first.text_content() == "你好，请用中文介绍一下北京。"

            # a second turn, stopped from the page: the server cancels the generation
            page.fill("#max_tokens", "3000")
            page.fill("#input", "再说一遍")
            page.press("#input", "Enter")
            page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2")
            page.wait_for_function(
                "() => document.querySelectorAll('.msg.assistant')[1].textContent.length >= 3"
            )
            page.click("#stop")
            page.wait_for_function(
                "() => document.querySelectorAll('.msg.assistant')[1].textContent.includes('stopped')"
            )
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
            page.click("#clear")
            assert page.locator(".msg").count() == 0
        finally:
            ctx.close()
    health = app.state.server.stats
    assert health["completed"] >= 1 and health["cancelled"] >= 1
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 5000
