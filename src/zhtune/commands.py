"""The table of ``zhtune`` subcommands: the module each runs, the extra it needs, and its one-line help.

A table and nothing else, so the dispatcher (``zhtune.cli``), ``zhtune recipes`` and the web studio read
one list without importing any command.
"""

from __future__ import annotations

# name -> (module with cli(argv), extra it needs or "", one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "vocab": (
        "zhtune.vocab.cli",
        "",
        "train, merge and compare Chinese vocabularies (zhtune vocab train|merge|stats)",
    ),
    "pt": (
        "zhtune.train.pt",
        "",
        "continued pre-training on plain text (embeddings, LoRA + embeddings, or full)",
    ),
    "sft": ("zhtune.train.sft", "", "instruction-tune (LoRA, QLoRA, full) on Alpaca/ShareGPT/messages data"),
    "dpo": (
        "zhtune.train.dpo",
        "align",
        "preference-tune after SFT on chosen/rejected pairs: DPO, IPO, ORPO, SimPO or KTO (TRL)",
    ),
    "grpo": (
        "zhtune.train.grpo",
        "align",
        "reinforcement learning with verifiable rewards (GRPO, TRL): labels, F1, regex, your own function",
    ),
    "chat": ("zhtune.infer.chat", "", "chat with a model (plus adapters) in the terminal"),
    "generate": ("zhtune.infer.generate", "", "answer a JSON/JSONL file of prompts in batches (resumable)"),
    "serve": ("zhtune.serve.server", "serve", "OpenAI-compatible API and web chat page"),
    "data": (
        "zhtune.data.cli",
        "data",
        "data tools: convert, merge, clean, filter, dedup, split, stats, generate",
    ),
    "merge": (
        "zhtune.merge.merge",
        "",
        "merge LoRA adapters (in order) into the base; write HF safetensors or GGUF",
    ),
    "export": (
        "zhtune.export.export",
        "",
        "export a model as GGUF (f16, q8_0, q4_0) for llama.cpp and Ollama",
    ),
    "eval": (
        "zhtune.eval.cli",
        "",
        "C-Eval/CMMLU/MMLU accuracy, bits per character and task accuracy; --compare models side by side",
    ),
    "pipeline": (
        "zhtune.pipeline.run",
        "",
        "run a recipe's stages (vocab, pt, sft, merge, export, eval) in one run directory, resumably",
    ),
    "recipes": ("zhtune.recipes", "", "list the shipped recipes, or copy one to start from"),
    "studio": (
        "zhtune.studio.server",
        "serve",
        "web page: prepare data, start and watch runs, compare results, chat (localhost by default)",
    ),
    "demo": (
        "zhtune.pipeline.run",
        "demo",
        "Chinese sentiment demo on the embedded default model (CPU, ~13 min): the demo-sentiment recipe",
    ),
}

# commands that run another with a shipped recipe: name -> (command, recipe under configs/, options added
# unless given, options renamed: to the command's own, or to a stage's option as STAGE.OPTION)
SHORTCUTS: dict[str, tuple[str, str, dict[str, str], dict[str, tuple[str, ...]]]] = {
    "demo": (
        "pipeline",
        "demo-sentiment/pipeline",
        {"run_dir": "runs/demo-{time}"},
        {
            "output_dir": ("run_dir",),
            "train_samples": ("data.sentiment_train",),
            "eval_samples": ("data.sentiment_eval",),
            "max_review_chars": ("data.max_review_chars",),
            "max_steps": ("sft.max_steps", "sft.save_steps"),
            "per_device_train_batch_size": ("sft.per_device_train_batch_size",),
            "learning_rate": ("sft.learning_rate",),
            "lora_rank": ("sft.lora_rank",),
            "lora_alpha": ("sft.lora_alpha",),
            "trainable": ("sft.trainable",),
            "max_seq_length": ("sft.max_seq_length",),
            "seed": ("data.seed", "sft.seed"),
        },
    ),
}


# commands that train, and so take torchrun's launch flags (--nproc_per_node, --nnodes, ...): see train.launch
DISTRIBUTED = ("sft", "pt", "dpo", "grpo")
