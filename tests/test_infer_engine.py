"""The generation engine: incremental decoding, stops, cancels, both backends, adapters, a trained model."""

from __future__ import annotations

import json
import threading
import time

import pytest
from infer_models import never_stopping_model, single_token

from zhtune.config.args import GenerationArgs, ModelArgs
from zhtune.errors import ConfigError
from zhtune.infer.engine import Engine, EngineArgs
from zhtune.infer.stream import Detokenizer, Job

GREEDY = dict(temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory, bpe_tokenizer_dir):
    return never_stopping_model(bpe_tokenizer_dir, tmp_path_factory.mktemp("looping"))


def load(path, **kw) -> Engine:
    return Engine.load(ModelArgs(model_name_or_path=str(path)), EngineArgs(**kw))


@pytest.mark.parametrize("fixture", ["bpe_tokenizer_dir", "sp_tokenizer_dir"])
def test_detokenizer_never_splits_characters(request, fixture):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(request.getfixturevalue(fixture)))
    text = "北京是中国的首都，Hello 世界！😀 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    pieces = [d.push([i]) for i in ids] + [d.push([], final=True)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


def feed(tok, text_tokens, stops=(), stop_ids=(), max_new=100):
    job = Job(
        [1, 2], GenerationArgs(), max_new_tokens=max_new, tokenizer=tok, stop_ids=stop_ids, stop_strings=stops
    )
    pieces = []
    for i in range(len(text_tokens)):
        job.set_tokens(text_tokens[: i + 1])
        pieces.append(job.poll())
        if job.done:
            break
    if not job.done:
        job.close()
        pieces.append(job.poll())
    return job, pieces


def test_job_stop_string_is_cut_and_never_shown(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    ids = tok("今天天气很好###结束了", add_special_tokens=False)["input_ids"]
    job, pieces = feed(tok, ids, stops=["###"])
    assert job.finish_reason == "stop"
    assert "".join(pieces) == job.text() == "今天天气很好"
    assert all("#" not in p for p in pieces)  # the start of a stop string is held back, never shown


def test_job_stop_token_length_and_error(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    eos = tok.eos_token_id
    a, b = single_token(tok, "好"), single_token(tok, "的")
    job, _ = feed(tok, [a, b, eos, a], stop_ids=[eos])
    assert (job.finish_reason, job.text(), job.reply().completion_tokens) == ("stop", "好的", 3)
    job, _ = feed(tok, [a, b, a, b], max_new=3)
    assert (job.finish_reason, job.text()) == ("length", "好的好")
    job = Job([1], GenerationArgs(), max_new_tokens=5, tokenizer=tok)
    job.set_tokens([a], finished=False, error="boom")
    assert job.run().finish_reason == "error" and job.error == "boom"


@pytest.mark.parametrize("backend", ["generate", "continuous", "static"])
def test_backends_agree_and_respect_length(tiny_llama_bpe, backend):
    engine = load(tiny_llama_bpe, max_batch_size=4)
    engine.start(backend)
    try:
        g = GenerationArgs(max_new_tokens=12, **GREEDY)
        prompts = ["你好", "今天天气很好", "Write a poem"]
        jobs = [
            engine.submit(engine.job(engine.prompt_ids([{"role": "user", "content": p}]), g)) for p in prompts
        ]
        replies = [j.run() for j in jobs]
    finally:
        engine.close()
    # greedy decoding of a random model: the reference is transformers generate on the same prompts
    ref_engine = load(tiny_llama_bpe)
    for p, r in zip(prompts, replies):
        ids = ref_engine.prompt_ids([{"role": "user", "content": p}])
        out = ref_engine.model.generate(
            __import__("torch").tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=ref_engine.stop_ids,
        )[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(out) if t in ref_engine.stop_ids), None)
        expect = ref_engine.tok.decode(out[:cut], skip_special_tokens=False).lstrip()
        assert r.text == expect
        assert r.finish_reason == ("stop" if cut is not None else "length")
        assert r.completion_tokens == (cut + 1 if cut is not None else 12)
        assert r.prompt_tokens == len(ids)


@pytest.mark.parametrize("backend", ["generate", "continuous", "static"])
def test_cancel_frees_the_request(looping_model, backend):
    engine = load(looping_model, max_batch_size=2)
    engine.start(backend)
    try:
        g = GenerationArgs(max_new_tokens=400, **GREEDY)
        job = engine.submit(engine.job(engine.prompt_ids([{"role": "user", "content": "你好"}]), g))
        seen = ""
        for piece in job:
            seen += piece
            if len(seen) >= 3:
                job.cancel()
        assert job.finish_reason == "cancelled"
        assert set(job.text()) <= {"好", "的"} and len(job.text()) >= 3
        # the engine keeps serving: the next request runs to its length limit
        nxt = engine.submit(
            engine.job(
                engine.prompt_ids([{"role": "user", "content": "再来"}]),
                g.__class__(max_new_tokens=5, **GREEDY),
            )
        )
        r = nxt.run()
        assert (r.finish_reason, len(r.text)) == ("length", 5)
        deadline = time.time() + 5
        while engine.pending() and time.time() < deadline:
            time.sleep(0.05)
        assert engine.pending() == 0
    finally:
        engine.close()


def test_request_cancel_from_another_thread_stops_generation(looping_model):
    engine = load(looping_model)
    engine.start("generate")
    try:
        job, pieces = engine.stream(
            [{"role": "user", "content": "你好"}], GenerationArgs(max_new_tokens=400, **GREEDY)
        )
        first = next(iter(pieces))
        threading.Thread(
            target=job.request_cancel
        ).start()  # cancel from another thread once a reply has begun
        text = first + "".join(pieces)
        assert job.finish_reason == "cancelled" and 0 < len(text) < 400
    finally:
        engine.close()


def test_stop_strings_and_context_limits(looping_model):
    engine = load(looping_model)
    engine.start("continuous")
    try:
        r = engine.chat(
            [{"role": "user", "content": "你好"}],
            GenerationArgs(max_new_tokens=50, stop=["的好的"], **GREEDY),
        )
        assert r.finish_reason == "stop" and "的好的" not in r.text and r.text
        ctx = engine.context_length
        assert engine.max_new_tokens(10, None) == ctx - 10
        assert engine.max_new_tokens(10, 10**6, clamp=True) == ctx - 10
        with pytest.raises(ConfigError, match="at most"):
            engine.max_new_tokens(10, ctx)
        with pytest.raises(ConfigError, match="context"):
            engine.max_new_tokens(ctx + 1, 1)
        with pytest.raises(ConfigError, match="--backend generate"):
            engine.submit(engine.job([1, 2], GenerationArgs(num_beams=2)))
    finally:
        engine.close()


def test_beam_search_and_repetition_penalty_run_on_generate(tiny_llama_bpe):
    engine = load(tiny_llama_bpe)
    engine.start("generate")
    try:
        r = engine.chat(
            [{"role": "user", "content": "你好"}],
            GenerationArgs(max_new_tokens=6, num_beams=3, temperature=0),
        )
        r2 = engine.chat(
            [{"role": "user", "content": "你好"}],
            GenerationArgs(max_new_tokens=6, repetition_penalty=1.3, seed=1),
        )
    finally:
        engine.close()
    assert r.finish_reason in ("stop", "length") and r.completion_tokens <= 6
    assert r2.finish_reason in ("stop", "length")


def test_adapters_in_order_and_their_template(tmp_path, tiny_llama_bpe):
    """Two LoRA adapters apply in order (merged one by one), and the last adapter's saved template is used."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhtune.text.templates import BuiltinFormat, builtin_specs, write_sidecar

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_bpe))
    dirs = []
    for k in range(2):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_bpe))
        pm = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        torch.manual_seed(k)
        d = tmp_path / f"lora{k}"
        pm.save_pretrained(d)
        dirs.append(d)
    tok.save_pretrained(dirs[1])
    write_sidecar(BuiltinFormat("vicuna", builtin_specs()["vicuna"], tok), dirs[1])
    engine = load(tiny_llama_bpe, lora_models=[str(d) for d in dirs])
    assert engine.fmt.name == "vicuna"
    assert "ASSISTANT:" in engine.tok.decode(engine.prompt_ids([{"role": "user", "content": "hi"}]))

    from peft import PeftModel

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_bpe))
    for d in dirs:
        ref = PeftModel.from_pretrained(ref, str(d)).merge_and_unload()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(engine.model(x).logits, ref(x).logits, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_bpe))(x).logits
        assert not torch.allclose(engine.model(x).logits, plain, atol=1e-3)


def test_a_model_trained_by_zhtune_stops(tmp_path, bpe_tokenizer_dir):
    """SFT teaches the end-of-turn token; the engine must stop there, not run to max_new_tokens."""
    from conftest import make_tiny_model

    from zhtune.train.sft import main as sft

    base = make_tiny_model(bpe_tokenizer_dir, tmp_path / "base")
    data = tmp_path / "data.json"
    recs = [
        {"instruction": q, "input": "", "output": "好的。"}
        for q in ("你好", "今天天气很好", "请介绍北京", "谢谢")
    ]
    data.write_text(json.dumps(recs * 4, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "sft"
    sft(
        {
            "model_name_or_path": str(base),
            "train_files": [str(data)],
            "output_dir": str(out),
            "finetuning_type": "full",
            "learning_rate": 3e-3,
            "max_steps": 40,
            "per_device_train_batch_size": 8,
            "logging_steps": 40,
            "save_steps": 1000,
            "warmup_ratio": 0.0,
            "lr_scheduler_type": "constant",
            "report_to": ["none"],
        }
    )
    for backend in ("generate", "continuous"):
        engine = load(out, backend=backend)
        engine.start(backend)
        try:
            r = engine.chat(
                [{"role": "user", "content": "你好"}], GenerationArgs(max_new_tokens=50, **GREEDY)
            )
        finally:
            engine.close()
        assert (r.text, r.finish_reason) == ("好的。", "stop"), backend
        assert r.completion_tokens < 50


def test_static_sampling_rules():
    import torch

    from zhtune.infer.static import pick

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    best = logits.argmax(-1)
    assert torch.equal(pick(logits, GenerationArgs(temperature=0)), best)
    assert torch.equal(pick(logits, GenerationArgs(temperature=1.0, top_k=1)), best)
    assert torch.equal(pick(logits, GenerationArgs(temperature=1.0, top_p=1e-6)), best)
    torch.manual_seed(1)
    a = pick(logits, GenerationArgs(temperature=1.0, top_k=5))
    torch.manual_seed(1)
    assert torch.equal(a, pick(logits, GenerationArgs(temperature=1.0, top_k=5)))
    top5 = logits.topk(5, -1).indices
    for _ in range(20):
        t = pick(logits, GenerationArgs(temperature=1.5, top_k=5, top_p=0.9))
        assert all(t[i] in top5[i] for i in range(3))


def test_continuous_options_parse_and_reach_transformers(tiny_llama_bpe):
    from zhtune.infer.engine import parse_continuous_options

    assert parse_continuous_options(
        "use_async_batching=false, max_batch_tokens=256,max_memory_percent=0.5"
    ) == {
        "use_async_batching": False,
        "max_batch_tokens": 256,
        "max_memory_percent": 0.5,
    }
    assert parse_continuous_options("scheduler_type=fifo,seed=none") == {
        "scheduler_type": "fifo",
        "seed": None,
    }
    with pytest.raises(
        ConfigError, match="'max_batch_token' is not a continuous batching setting.*max_batch_tokens"
    ):
        EngineArgs(continuous_options="max_batch_token=256")
    with pytest.raises(ConfigError, match="'block_size' is not key=value"):
        EngineArgs(continuous_options="block_size")
    # they go last: over zhtune's own CPU choices (block size 64, 512 batch tokens)
    args = EngineArgs(backend="continuous", continuous_options="block_size=32,max_batch_tokens=128")
    engine = Engine.load(ModelArgs(model_name_or_path=str(tiny_llama_bpe)), args)
    engine.start("continuous")
    try:
        cfg = engine.backend.manager.continuous_batching_config
        assert (cfg.block_size, cfg.max_batch_tokens) == (32, 128)
        g = GenerationArgs(max_new_tokens=5, temperature=0, repetition_penalty=1.0)
        job = engine.submit(engine.job(engine.prompt_ids([{"role": "user", "content": "你好"}]), g))
        assert job.run().completion_tokens == 5
    finally:
        engine.close()
