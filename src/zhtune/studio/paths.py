"""Which options name files or folders, and the check that every such value stays inside the workspace.

An option is a path by its name (``*_file``, ``*_dir``, ``*_path``, ``lora_models``, ...; the full list is
:data:`PATH_FIELDS`, and a test checks that every option whose help mentions a file, folder or directory is
either here or in :data:`NOT_PATHS` with its reason). Values are checked wherever they appear: in a form
field, inside a mapping (``extra``, a pipeline stage's ``with``, an eval task) or in a list. Pipeline
references (``${run_dir}``, ``${stage.X}``, ``${data.X}``) are checked as the run folder they expand into.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from zhtune.errors import ConfigError
from zhtune.studio.workspace import Workspace

PATH_FIELDS = frozenset(
    {
        "model_name_or_path",
        "tokenizer_name_or_path",
        "gguf_file",
        "gguf_name",
        "cache_dir",
        "data_cache_dir",
        "dataset_dir",
        "train_files",
        "validation_file",
        "peft_path",
        "reward_fn",  # FILE.py:function, user code that grpo imports: it must lie in the workspace
        "output_dir",
        "run_dir",
        "logging_dir",
        "resume_from_checkpoint",
        "deepspeed",
        "lora_models",
        "lora_model",
        "offload_dir",
        "base_tokenizer",
        "chinese_sp_model_file",
        "check_files",
        "clusters_file",
        "data_dir",
        "in_file",
        "input",
        "input_file",
        "out_file",
        "output_file",
        "phrases_file",
        "plot_file",
        "prompt_template",
        "report_file",
        "report_text",
        "seed_tasks",
        "task_file",
        "text_files",
        "tokenizers",
        "vocab",
        "api_key_file",
        "compare",
    }
)
# options whose help mentions files or folders but whose value is not a path
NOT_PATHS = {
    "output_format": "a layout name (json, jsonl, auto)",
    "text_field": "a field name inside .jsonl records",
    "to": "a record format name",
    "overwrite": "a yes/no switch",
    "overwrite_output_dir": "a yes/no switch",
    "overwrite_cache": "a yes/no switch",
    "format": "an output format name",
    "add_ids": "a yes/no switch",
    "id_field": "a field name",
    "stages": "a list of stages whose options are checked one by one",
    "tasks": "a list of eval tasks whose options are checked one by one",
    "variants": "named overrides whose options are checked one by one",
    "extra": "pass-through options, checked one by one",
    "save_total_limit": "a number of checkpoints",
    "max_shard_size": "a size such as 2GB",
    "quant": "a tensor type name",
    "template": "a chat template name",
    "allow_pickle": "a yes/no switch",
    "skip_bad_records": "a yes/no switch",
    "dataloader_num_workers": "a number of processes",
    "max_documents": "a count",
    "dry_run": "a yes/no switch",
    "dtype": "a dtype name",
    "served_model_name": "the model id clients send",
    "num_samples": "a count of tasks",
    "output_type": "huggingface or gguf",
    "fused_lora": "a yes/no switch",
    "compile_layers": "a yes/no switch",
    "fp8_base": "a yes/no switch",
    "task_metric": "a metric name",
}
# values that name no file: the embedded model, and --resume_from_checkpoint's words
KEYWORDS = {
    "model_name_or_path": {"default"},
    "base_tokenizer": {"default"},
    "tokenizers": {"default"},
    "resume_from_checkpoint": {"true", "false", "auto", "latest", "yes", "no", "none", "1", "0"},
}
REF = re.compile(r"\$\{(run_dir|stage\.[\w.-]+|data\.[\w.-]+)\}")


def is_path_field(name: str) -> bool:
    return name in PATH_FIELDS


def check_value(ws: Workspace, key: str, value: Any, run_root: Path | None = None) -> None:
    """Refuse any path under ``key`` (recursively through lists and mappings) that leaves the workspace."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_value(ws, str(k) if is_path_field(str(k)) else key, v, run_root)
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_value(ws, key, v, run_root)
        return
    if not is_path_field(key) or value is None or isinstance(value, (bool, int, float)):
        return
    text = str(value)
    if text.lower() in KEYWORDS.get(key, ()):
        return
    if key == "compare":
        for entry in text.split(","):
            for part in entry.split("=", 1)[-1].split("+"):
                if part.strip() and part.strip() != "default":
                    ws.path(expand(part.strip(), run_root), "compare")
        return
    for part in text.split(",") if "," in text else [text]:
        if part.strip():
            ws.path(expand(part.strip(), run_root), key)


def expand(text: str, run_root: Path | None) -> str:
    """Pipeline references as the folders they become inside the run (for the check only)."""
    if "${" not in text:
        return text
    if run_root is None:
        raise ConfigError(f"{text!r}: ${{...}} references work only in pipeline recipes")

    def folder(m: re.Match) -> str:
        kind, _, name = m.group(1).partition(".")
        return str(run_root if kind == "run_dir" else run_root / (name if kind == "stage" else "data"))

    return REF.sub(folder, text)


def check_options(ws: Workspace, given: dict[str, dict[str, Any]], run_root: Path | None = None) -> None:
    """Every path in a form's values (``{section: {option: value}}``), nested ones included."""
    for fields in given.values():
        for key, value in fields.items():
            check_value(ws, key, value, run_root)
