"""Adapters for merge tests: made with plain peft on tiny models, optionally with a resized vocabulary.

LoRA B matrices start at zero in peft, which would make every merge trivially equal to the base, so
the helpers give every trained tensor random values (as training would) before saving.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    seed: int,
    targets: list[str],
    modules_to_save: list[str] | None = None,
    tokenizer_dir: Path | None = None,
    base_adapters: list[Path] = (),
    r: int = 4,
    alpha: float = 8.0,
    save_embeddings: bool | str = "auto",
) -> Path:
    """A LoRA adapter for ``model_dir`` (after ``base_adapters`` merged), on a vocabulary resized to the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    model = reference_model(model_dir, base_adapters)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(str(out), save_embedding_layers=save_embeddings)
    tok.save_pretrained(str(out))
    return out


def reference_model(model_dir: Path, adapters: list[Path] = (), dtype=torch.float32):
    """The base with adapters merged in order by peft itself (the oracle for zhtune merge)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    for a in adapters:
        with safe_open(str(Path(a) / "adapter_model.safetensors"), framework="pt") as f:
            rows = [
                f.get_slice(k).get_shape()[0]
                for k in f.keys()
                if k.endswith(("embed_tokens.weight", "lm_head.weight", "embed_tokens.base_layer.weight"))
            ]
        if rows and rows[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows[0], mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    return model.eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
