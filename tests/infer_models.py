"""Tiny models with known behaviour for the inference, chat and server tests, and a server runner."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import make_tiny_model


def single_token(tok: Any, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {ids} in this tokenizer"
    return ids[0]


def never_stopping_model(tok_dir: Path, out: Path, a: str = "好", b: str = "的", context: int = 512) -> Path:
    """A model that greedily answers with ``a`` and ``b`` only, never an end-of-turn token.

    The final norm keeps one hidden dimension and the output head reads only that one, +1 for ``a``, -1 for
    ``b``: every other token (eos included) gets logit 0 and the winner always has a positive logit.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    make_tiny_model(tok_dir, out, tie=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    ta, tb = single_token(tok, a), single_token(tok, b)
    model = LlamaForCausalLM.from_pretrained(str(out))
    model.config.max_position_embeddings = context
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ta, 0] = 1.0
        model.lm_head.weight[tb, 0] = -1.0
    model.save_pretrained(out, safe_serialization=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: Any, log: Path, timeout: float, poll: float = 0.2) -> None:
    """Wait until a ``zhtune serve`` subprocess answers /health; fail with its log if it dies or times out."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(poll)


@contextlib.contextmanager
def running_server(cfg: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Serve ``cfg`` (zhtune serve options) with uvicorn in a thread; yields (base_url, app)."""
    import uvicorn

    from zhtune.serve.server import build_app

    port = free_port()
    app, engine = build_app({**cfg, "port": port})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not th.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        th.join(timeout=15)
        engine.close()
