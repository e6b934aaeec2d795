"""``zhtune merge``: fold LoRA adapters into the base model, in the order given, and write a model people deploy.

``--output_type huggingface`` writes sharded safetensors, config, generation config, the tokenizer with
its chat template, and the resolved config with package versions; ``--output_type gguf`` writes one GGUF
file instead (see ``zhtune export``). Adapters that resized the vocabulary (modules_to_save
embed_tokens/lm_head) merge too, and the output carries the tokenizer of the last adapter that has one.

Before anything is written, base, tokenizer and every adapter are checked to agree. The merge reads the
base one tensor at a time from its shards and applies each adapter to that tensor, so memory stays near
one output shard however large the model; the output appears at --output_dir only when complete.
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
class MergeArgs:
    """what to merge and where to write it"""

    lora_models: list[str] | None = field(
        None, "LoRA adapters merged strictly in this order, comma separated. Alias: --lora_model."
    )
    output_type: Literal["huggingface", "gguf"] = field(
        "huggingface", "huggingface (safetensors directory) or gguf (one file; see --quant)."
    )
    output_dir: str | None = field(None, "Where the merged model goes; it appears only once complete.")
    max_shard_size: str = field("2GB", "Largest safetensors shard, e.g. 2GB or 500MB.")
    offload_dir: str | None = field(
        None,
        "Kept for the Chinese-LLaMA-Alpaca command lines. Unused: zhtune always merges tensor by tensor from "
        "the shards on disk, so there is nothing to offload.",
    )
    template: str | None = field(
        None, "Chat template to store with the model (default: the one saved with the last adapter)."
    )
    overwrite_output_dir: bool = field(
        False, "Replace an existing --output_dir (the old one stays until the new one is whole)."
    )

    def __post_init__(self) -> None:
        if not self.lora_models:
            raise ConfigError("--lora_model is required: one adapter directory, or several comma separated")
        if not self.output_dir:
            raise ConfigError("--output_dir is required")


SECTIONS = {"model": ModelArgs, "merge": MergeArgs, "gguf": GgufArgs}
DESCRIPTION = (
    "Merge LoRA adapters (in order) into a base model; write a Hugging Face directory or a GGUF file."
)


def main(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    from zhtune.atomic import atomic_dir
    from zhtune.config.parse import save_config
    from zhtune.merge.hf import check_dtype, parse_size, write_model_files, write_weights
    from zhtune.model.merged import plan_for

    if not isinstance(cfg, Config):
        cfg = build(SECTIONS, cfg)
    m, a, g = cfg.model, cfg.merge, cfg.gguf
    if m.load_in_8bit or m.load_in_4bit:
        raise ConfigError(
            "merge writes full-precision weights; for a quantized model use --output_type gguf --quant q8_0|q4_0"
        )
    if a.offload_dir:
        log.info("--offload_dir is not needed: the merge goes tensor by tensor from the shards on disk")
    max_bytes = parse_size(a.max_shard_size)
    _, plan = plan_for(m, a.lora_models, "merge")
    out = Path(a.output_dir)  # type: ignore[arg-type]
    if out.exists() and not a.overwrite_output_dir:
        raise ConfigError(f"{out} already exists; pass --overwrite_output_dir or choose another --output_dir")
    dtype = check_dtype(m.dtype, plan.base.dtype)
    print(
        f"merging {len(plan.adapters)} adapter(s) into {plan.base.dir}: "
        f"{len(plan.tensors.names)} tensors, vocabulary {plan.rows} rows, tokenizer from {plan.tokenizer_dir}",
        flush=True,
    )
    summary: dict[str, Any] = {"output_dir": str(out), **plan.summary()}
    with atomic_dir(out, overwrite=a.overwrite_output_dir) as tmp:
        if a.output_type == "huggingface":
            summary.update(write_weights(plan, tmp, dtype, max_bytes))
            summary["chat_template"] = write_model_files(plan, tmp, dtype, a.template)
            summary["dtype"] = str(dtype).replace("torch.", "")
            marker = "zhtune_merge.yaml"
        else:
            from zhtune.export.export import write_plan_gguf

            fname = g.gguf_name or f"{out.name}-{g.quant}.gguf"
            summary.update(write_plan_gguf(plan, tmp / fname, g.quant, a.template, out.name))
            summary["path"] = str(out / fname)
            marker = f"{Path(fname).stem}.zhtune.yaml"
        save_config(cfg, tmp / marker, extra={"result": summary})
    return summary


def print_summary(s: dict[str, Any]) -> None:
    rows = [("output", s.get("path", s["output_dir"])), ("base", s["base"])]
    rows += [(f"adapter {i + 1}", p) for i, p in enumerate(s["adapters"])]
    rows += [
        (
            "vocabulary",
            f"{s['vocab_rows']} rows, tokenizer {s['tokenizer_size']} tokens from {s['tokenizer']}",
        )
    ]
    if "shards" in s:
        rows += [("weights", f"{s['bytes'] / 2**20:.1f} MiB {s['dtype']} in {s['shards']} shard(s)")]
        rows += [("chat template", s["chat_template"])]
    else:
        rows += [("gguf", f"{s['quant']}, {s['bytes'] / 2**20:.1f} MiB")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cli(argv: list[str] | None = None) -> int:
    cfg = parse_cli(argv, SECTIONS, prog="zhtune merge", description=DESCRIPTION)
    print_summary(main(cfg))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(cli())
