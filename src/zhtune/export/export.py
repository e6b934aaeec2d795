"""``zhtune export --format gguf --quant f16|q8_0|q4_0``: a model (plus optional LoRA adapters) as one GGUF file.

The GGUF carries the weights (llama architecture), the tokenizer (SentencePiece or byte-level BPE, an
extended Chinese vocabulary included), special tokens and the chat template, so llama.cpp, Ollama and
transformers (``gguf_file=``) run it without the original directory. Several quantizations can live side
by side in one --output_dir; each file appears only once it is complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhtune.config.args import GgufArgs, ModelArgs
from zhtune.config.parse import Config, build, field, parse_cli
from zhtune.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ExportArgs:
    """what to export and where"""

    format: Literal["gguf"] = field("gguf", "Output format (gguf).")
    output_dir: str | None = field(None, "Directory the GGUF file (and its resolved config) is written to.")
    lora_models: list[str] | None = field(
        None, "LoRA adapters merged in order before export, comma separated. Alias: --lora_model."
    )
    template: str | None = field(
        None, "Chat template stored in the GGUF (default: the one saved with the model or adapter)."
    )
    overwrite_output_dir: bool = field(False, "Replace a GGUF of the same name in --output_dir.")
    verify: bool = field(
        False,
        "Then run the GGUF in llama.cpp (pip install 'zhtune[llamacpp]') and check it answers a Chinese prompt "
        "token for token as zhtune does.",
    )

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("--output_dir is required: the directory the .gguf file is written to")


SECTIONS = {"model": ModelArgs, "export": ExportArgs, "gguf": GgufArgs}
DESCRIPTION = "Export a model (plus optional LoRA adapters) as a llama-architecture GGUF file."


def chat_template_of(plan: Any, template: str | None) -> str | None:
    """The Jinja chat template to store: a built-in by name, zhtune's recorded one, or the tokenizer's."""
    from zhtune.text.templates import SIDECAR, get_format

    tdir = Path(plan.template_dir)
    if template or (tdir / SIDECAR).is_file():
        return get_format(plan.tokenizer, template, directory=tdir).jinja()
    return getattr(plan.tokenizer, "chat_template", None)


def write_plan_gguf(plan: Any, path: Path, quant: str, template: str | None, name: str) -> dict[str, Any]:
    """Write a merge plan (a checkpoint with zero or more adapters) as GGUF at ``path``."""
    import torch

    from zhtune.export.gguf import write_gguf
    from zhtune.export.gguf_vocab import build_vocab
    from zhtune.model.merged import merged_config

    config = merged_config(plan, torch.float16)
    rows = plan.rows or config["vocab_size"]
    vocab = build_vocab(plan.tokenizer, plan.tokenizer_dir, rows, chat_template_of(plan, template))
    return write_gguf(plan.tensors, config, vocab, path, quant=quant, name=name)


def default_name(model: str, quant: str) -> str:
    stem = Path(model.rstrip("/")).name or "model"
    return f"{stem}-{quant}.gguf"


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from zhtune.atomic import publish_files, tmp_sibling
    from zhtune.config.parse import save_config
    from zhtune.model.merged import plan_for

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    m, e, g = cfg.model, cfg.export, cfg.gguf
    src, plan = plan_for(m, e.lora_models, "export")
    out = Path(e.output_dir)  # type: ignore[arg-type]
    fname = g.gguf_name or default_name(
        e.lora_models[-1]
        if e.lora_models
        else (m.model_name_or_path if src.kind != "default" else "smollm2-135m-instruct"),
        g.quant,
    )
    if (out / fname).exists() and not e.overwrite_output_dir:
        raise ConfigError(f"{out / fname} already exists; pass --overwrite_output_dir or choose --gguf_name")
    staging = tmp_sibling(out / fname)
    staging.mkdir(parents=True)
    try:
        info = write_plan_gguf(plan, staging / fname, g.quant, e.template, Path(fname).stem)
        save_config(
            cfg, staging / f"{Path(fname).stem}.zhtune.yaml", extra={"export": {**plan.summary(), **info}}
        )
        info["path"] = str(out / fname)
        publish_files(staging, out, last=[fname])
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    if e.verify:
        from zhtune.export.verify import verify

        vargs = ModelArgs(**{**m.__dict__, "device": "cpu", "dtype": "float32"})
        info["llama_cpp"] = verify(vargs, list(e.lora_models or []), info["path"])
    return info


def print_summary(info: dict[str, Any]) -> None:
    rows = [
        ("file", info["path"]),
        ("size", f"{info['bytes'] / 2**20:.1f} MiB"),
        ("quant", info["quant"]),
        ("tensors", ", ".join(f"{k} {v}" for k, v in sorted(info["tensors"].items()))),
        ("vocabulary", str(info["vocab"])),
    ]
    v = info.get("llama_cpp")
    if v is not None:
        verdict = "same" if v["match"] and v["prompt_tokens_match"] else "DIFFERENT"
        rows.append(
            (
                "llama.cpp",
                f"{verdict} greedy reply ({v['same_prefix_tokens']} tokens agree): {v['llama_cpp_text']!r}",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune export", description=DESCRIPTION)
    info = main(cfg)
    print_summary(info)
    v = info.get("llama_cpp")
    return 0 if v is None or (v["match"] and v["prompt_tokens_match"]) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
