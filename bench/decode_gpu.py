"""Decode speed of a 7B-shaped Llama on one GPU: batch 1 against the memory-bandwidth limit, and 32
concurrent streaming requests through ``zhtune serve``.

The model is Llama-2-7B-shaped with random weights (bf16) and a synthetic 32,000-word tokenizer with a
ChatML template, so nothing is downloaded. Each decoding step must read every weight once, so at batch 1
the limit is ``weight bytes / memory bandwidth`` (about 3.0 TB/s sustained on an H100 SXM).

Sections, most important first; a section that fails is recorded and the next one runs, and no section
starts after the time budget (--budget_s, default 330 s):

1. ``continuous_sweep``: transformers' continuous batching in this process, one setting at a time (CUDA graphs
   with their KV padding interval, asynchronous batching, the UTF-8 guard off, compile level 1), each with
   ``--concurrency`` requests decoding at once (two waves, sampled as the load clients ask);
2. ``zhtune serve --backend continuous`` with the sweep's fastest setting a server can be given: 1 client,
   then ``--concurrency`` streaming clients;
3. batch 1, ``static`` backend with --compile (static KV cache, the step a CUDA graph, host pipelined);
4. ``zhtune serve --backend continuous`` (transformers' own choices): ``--concurrency`` clients.

    python bench/decode_gpu.py                      # prints a table, writes bench/results/decode_gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
T0 = time.time()


def build_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    dims = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    if args.smoke:  # a CPU check of the script's plumbing, not a measurement
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg = LlamaConfig(
        vocab_size=32000,
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=4,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cpu" if args.smoke else "cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    model.eval()
    # byte-level: the 256 byte symbols, then words "w<i>" up to the vocabulary size; no merges, so text
    # encodes byte by byte while the model samples whole words too. Its tokens read as bytes, so the UTF-8
    # guard is on, as with a real byte-level or byte-fallback tokenizer.
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    k = 0
    while len(vocab) < cfg.vocab_size:
        vocab.setdefault(f"w{k}", len(vocab))
        k += 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    tok.padding_side = "left"
    return model, tok


def prompt(i: int = 0, words: int = 24) -> str:
    return " ".join(f"w{(i * 7919 + k * 104729) % 31000}" for k in range(words))


def time_job(engine: Any, g: Any, n: int, i: int = 0) -> dict[str, Any]:
    ids = engine.prompt_ids([{"role": "user", "content": prompt(i)}])
    job = engine.submit(engine.job(ids, g, max_new_tokens=n))
    reply = job.run()
    end = time.perf_counter()
    dec = (reply.completion_tokens - 1) / (end - job.first_token_at) if reply.completion_tokens > 1 else None
    return {
        "completion_tokens": reply.completion_tokens,
        "ttft_s": round(job.first_token_at - job.created, 4),
        "decode_tok_s": round(dec, 1) if dec else None,
        "finish_reason": reply.finish_reason,
    }


def batch1(model: Any, tok: Any, backend: str, compile: bool, n: int, warmups: int) -> dict[str, Any]:
    import torch

    from zhtune.config.args import GenerationArgs
    from zhtune.infer.engine import Engine, EngineArgs
    from zhtune.text.templates import get_format

    engine = Engine(
        model, tok, get_format(tok), EngineArgs(backend=backend, compile=compile, max_batch_size=1)
    )
    engine.start(backend)
    greedy = GenerationArgs(max_new_tokens=n, temperature=0, repetition_penalty=1.0)
    try:
        t = time.perf_counter()
        for w in range(warmups):  # same lengths as the timed runs: compile and capture graphs once
            time_job(engine, greedy, n, i=100 + w)
        warm_s = time.perf_counter() - t
        runs = [time_job(engine, greedy, n, i=k) for k in range(2)]
        out = {"warmup_s": round(warm_s, 1), "greedy": max(runs, key=lambda r: r["decode_tok_s"] or 0)}
        if backend == "static":
            sampled = GenerationArgs(
                max_new_tokens=n, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0
            )
            out["sampled"] = time_job(engine, sampled, n, i=7)
        return out
    finally:
        engine.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()


# (name, engine settings, UTF-8 guard): the settings a server takes as --cuda_graphs / --compile /
# --continuous_options; the guard is always on in a server, so the arm without it only measures its cost
SWEEP: list[tuple[str, dict[str, Any], bool]] = [
    ("graphs", {"cuda_graphs": True}, True),
    ("graphs_async", {"cuda_graphs": True, "continuous_options": "use_async_batching=true"}, True),
    ("graphs_noguard", {"cuda_graphs": True}, False),
    ("graphs_async_noguard", {"cuda_graphs": True, "continuous_options": "use_async_batching=true"}, False),
    ("graphs_kv256", {"cuda_graphs": True, "continuous_options": "kv_padding_interval_size=256"}, True),
    ("graphs_compile", {"cuda_graphs": True, "compile": True}, True),
]


def cb_arm(model: Any, tok: Any, settings: dict[str, Any], guard: bool, c: int, n: int) -> dict[str, Any]:
    """``2 * c`` sampled requests of ``n`` new tokens through one continuous batching engine, ``c`` at once."""
    from concurrent.futures import ThreadPoolExecutor
    from unittest import mock

    import torch

    from zhtune.config.args import GenerationArgs
    from zhtune.infer import utf8_continuous
    from zhtune.infer.engine import Engine, EngineArgs
    from zhtune.text.templates import get_format

    engine = Engine(
        model, tok, get_format(tok), EngineArgs(backend="continuous", max_batch_size=c, **settings)
    )
    t = time.perf_counter()
    # the arms without the guard leave it out as a server never does: by not installing it
    with mock.patch.object(
        utf8_continuous, "install", utf8_continuous.install if guard else lambda m, g: False
    ):
        engine.start("continuous")
    g = GenerationArgs(max_new_tokens=n, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0)

    def wave(count: int, tokens: int, first: int) -> tuple[float, int, list[Any]]:
        jobs = []
        t0 = time.perf_counter()
        for i in range(count):
            ids = engine.prompt_ids([{"role": "user", "content": prompt(first + i)}])
            jobs.append(engine.submit(engine.job(ids, g, max_new_tokens=tokens)))
        with ThreadPoolExecutor(max(1, count)) as pool:
            replies = list(pool.map(lambda j: j.run(), jobs))
        return time.perf_counter() - t0, sum(r.completion_tokens for r in replies), jobs

    try:
        wave(c, 32, 1000)  # warm-up: the graphs of a full batch and of the prefill
        warm_s = time.perf_counter() - t
        elapsed, tokens, jobs = wave(2 * c, n, 0)
        ttft = sorted(j.first_token_at - j.created for j in jobs if j.first_token_at)
        cfg = engine.backend.manager.continuous_batching_config
        return {
            "settings": settings,
            "utf8_guard_asked": guard,
            "utf8_guard": bool(engine.backend.utf8_guard),
            "warmup_s": round(warm_s, 1),
            "requests": len(jobs),
            "completion_tokens": tokens,
            "elapsed_s": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None,
            "resolved": {
                k: str(getattr(cfg, k, None))
                for k in (
                    "use_cuda_graph",
                    "use_async_batching",
                    "num_blocks",
                    "max_batch_tokens",
                    "q_padding_interval_size",
                    "kv_padding_interval_size",
                )
            },
        }
    finally:
        engine.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def cb_sweep(model: Any, tok: Any, c: int, n: int, deadline: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, settings, guard in SWEEP:
        if time.time() - T0 > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        print(f"[{time.time() - T0:5.0f}s]   sweep {name} ...", flush=True)
        try:
            out[name] = cb_arm(model, tok, settings, guard, c, n)
        except Exception as e:  # noqa: BLE001 - recorded; the next setting still runs
            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        print(f"            {json.dumps(out[name])[:400]}", flush=True)
    return out


def server_flags(settings: dict[str, Any]) -> list[str]:
    flags = ["--backend", "continuous"]
    if settings.get("cuda_graphs") is not None:
        flags += ["--cuda_graphs", str(settings["cuda_graphs"]).lower()]
    if settings.get("compile"):
        flags.append("--compile")
    if settings.get("continuous_options"):
        flags += ["--continuous_options", settings["continuous_options"]]
    return flags


def serve_run(
    model_dir: Path, extra: list[str], clients: list[int], n: int, seconds: float
) -> dict[str, Any]:
    import httpx
    from serve_load import load, start_server

    log = (
        ROOT
        / "bench"
        / "results"
        / f"decode_gpu_serve_{re.sub(r'[^A-Za-z0-9_]+', '_', '_'.join(extra)).strip('_') or 'default'}.log"
    )
    t = time.time()
    proc, url = start_server(str(model_dir), extra[1], max(clients), extra[2:], log)
    out: dict[str, Any] = {"args": extra, "startup_s": round(time.time() - t, 1)}
    try:
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(load(url, name, min(4, max(clients)), 0, 64))  # warm-up
        for c in clients:
            out[f"clients_{c}"] = asyncio.run(load(url, name, c, seconds if c > 1 else 0, n))
        out["health"] = httpx.get(url + "/health", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="decode tok/s for a 7B-shaped Llama on one GPU")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per request")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15, help="how long the concurrent clients keep sending")
    ap.add_argument("--bandwidth_tb_s", type=float, default=3.0, help="sustained memory bandwidth, TB/s")
    ap.add_argument("--budget_s", type=float, default=330, help="start no new section after this long")
    ap.add_argument(
        "--workdir", default="/dev/shm/zhtune-bench-7b", help="where the model is saved for the server"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_gpu.json"))
    ap.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing"
    )
    args = ap.parse_args()

    import torch

    if args.smoke:
        args.tokens, args.concurrency, args.seconds = 16, 4, 2
    elif not torch.cuda.is_available():
        print("decode_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    res: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (smoke run on CPU)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "tokens_per_request": args.tokens,
        "sections": {},
    }
    try:
        import flash_attn  # noqa: F401

        res["flash_attn"] = True
    except ImportError:
        res["flash_attn"] = False
    model, tok = build_model(args)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["weight_gb"] = round(nbytes / 1e9, 2)
    res["batch1_limit_tok_s"] = round(args.bandwidth_tb_s * 1e12 / nbytes, 1)
    print(
        f"model: {nbytes / 1e9:.2f} GB of weights -> batch-1 limit {res['batch1_limit_tok_s']} tok/s "
        f"at {args.bandwidth_tb_s} TB/s",
        flush=True,
    )
    workdir = Path(args.workdir)
    t = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(workdir, safe_serialization=True)
    tok.save_pretrained(workdir)
    res["save_s"] = round(time.time() - t, 1)

    def section(name: str, fn: Any) -> None:
        if time.time() - T0 > args.budget_s:
            res["sections"][name] = {"skipped": "time budget spent"}
            return
        print(f"[{time.time() - T0:5.0f}s] {name} ...", flush=True)
        try:
            res["sections"][name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            res["sections"][name] = {
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-2000:],
            }
        print(json.dumps(res["sections"][name], indent=1)[:1500], flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    n, c = args.tokens, args.concurrency
    held = {"model": model}
    del model
    sweep_end = args.budget_s * 0.6  # the sweep leaves time for the server runs after it
    section("continuous_sweep", lambda: cb_sweep(held["model"], tok, c, n, sweep_end))
    arms = res["sections"].get("continuous_sweep", {})
    servable = {k: v for k, v in arms.items() if v.get("utf8_guard_asked") and v.get("tokens_per_s")}
    best = max(servable, key=lambda k: servable[k]["tokens_per_s"], default="graphs")
    res["best_servable_setting"] = best
    flags = server_flags(next(st for name, st, _ in SWEEP if name == best))
    section("serve_continuous_best", lambda: serve_run(workdir, flags, [1, c], n, args.seconds))
    section("batch1_static_compiled", lambda: batch1(held["model"], tok, "static", True, n, warmups=2))
    held.clear()  # free the in-process copy before the last server
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    section(
        "serve_continuous_default",
        lambda: serve_run(workdir, ["--backend", "continuous"], [c], n, args.seconds),
    )

    s = res["sections"]
    rows = [
        (
            "batch 1, static + compile",
            s.get("batch1_static_compiled", {}).get("greedy", {}).get("decode_tok_s"),
        ),
        *(
            (f"in-process continuous {k}, {c} at once", v.get("tokens_per_s"))
            for k, v in s.get("continuous_sweep", {}).items()
        ),
        (
            f"serve continuous {res.get('best_servable_setting')}, 1 client",
            s.get("serve_continuous_best", {}).get("clients_1", {}).get("decode_tok_s_per_request_p50"),
        ),
        (
            f"serve continuous {res.get('best_servable_setting')}, {c} clients",
            s.get("serve_continuous_best", {}).get(f"clients_{c}", {}).get("tokens_per_s"),
        ),
        (
            f"serve continuous default, {c} clients",
            s.get("serve_continuous_default", {}).get(f"clients_{c}", {}).get("tokens_per_s"),
        ),
    ]
    res["summary_tok_s"] = dict(rows)
    res["total_s"] = round(time.time() - T0, 1)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"\n{res['gpu']}: batch-1 limit {res['batch1_limit_tok_s']} tok/s ({res['weight_gb']} GB at "
        f"{args.bandwidth_tb_s} TB/s)"
    )
    for name, v in rows:
        print(f"  {name:<40} {v if v is not None else '-':>10} tok/s")
    print(f"saved {args.out} ({res['total_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
