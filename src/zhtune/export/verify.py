"""Check a GGUF export in llama.cpp: same prompt tokens and the same greedy reply as zhtune's own engine.

llama.cpp comes through llama-cpp-python (``pip install 'zhtune[llamacpp]'``, which compiles llama.cpp).
The prompt is built by zhtune's chat engine from the model's chat template, so the check covers the
weights, the Q/K layout, the tokenizer metadata and the special tokens at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zhtune.deps import require

DEFAULT_PROMPT = "请用一句话介绍北京。"


def zhtune_greedy(margs: Any, lora_models: list[str], prompt: str, n: int) -> dict[str, Any]:
    """Prompt ids and greedy continuation (up to the first stop token) from zhtune's chat engine."""
    from zhtune.infer.engine import Engine, EngineArgs

    eng = Engine.load(margs, EngineArgs(lora_models=list(lora_models) or None))
    ids = eng.prompt_ids([{"role": "user", "content": prompt}])
    device = eng.model.device
    with torch.no_grad():
        out = eng.model.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eng.stop_ids,
            pad_token_id=eng.tok.pad_token_id,
        )
    new = []
    for t in out[0, len(ids) :].tolist():
        if t in eng.stop_ids:
            break
        new.append(t)
    return {
        "prompt_ids": ids,
        "ids": new,
        "stop_ids": eng.stop_ids,
        "text": eng.tok.decode(new),
        "tokenizer": eng.tok,
    }


def llama_cpp_greedy(gguf: str | Path, prompt_ids: list[int], stop_ids: list[int], n: int) -> list[int]:
    llama_cpp = require("llama_cpp", "running GGUF files in llama.cpp")
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=max(512, len(prompt_ids) + n + 8), n_threads=2, verbose=False, seed=0
    )
    out: list[int] = []
    for t in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if t in stop_ids or llm.token_eos() == t or len(out) >= n:
            break
        out.append(t)
    return out


def llama_cpp_tokenize(gguf: str | Path, text: str) -> list[int]:
    llama_cpp = require("llama_cpp", "running GGUF files in llama.cpp")
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def verify(
    margs: Any, lora_models: list[str], gguf: str | Path, prompt: str = DEFAULT_PROMPT, n: int = 24
) -> dict[str, Any]:
    """Compare llama.cpp with zhtune on one chat prompt; ``match`` is True when both agree token for token."""
    ours = zhtune_greedy(margs, lora_models, prompt, n)
    tok = ours.pop("tokenizer")
    text = tok.decode(ours["prompt_ids"])
    theirs = llama_cpp_greedy(gguf, ours["prompt_ids"], ours["stop_ids"], n)
    same_prefix = 0
    for a, b in zip(ours["ids"], theirs):
        if a != b:
            break
        same_prefix += 1
    return {
        "prompt": prompt,
        "prompt_tokens_match": llama_cpp_tokenize(gguf, text) == ours["prompt_ids"],
        "zhtune_ids": ours["ids"],
        "llama_cpp_ids": theirs,
        "zhtune_text": ours["text"],
        "llama_cpp_text": tok.decode(theirs),
        "same_prefix_tokens": same_prefix,
        "match": theirs == ours["ids"],
    }
