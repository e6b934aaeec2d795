"""Load a causal LM and its tokenizer from wherever it lives; used by every command.

Sources: a local HF directory, a .gguf file (dequantized by transformers, cached as safetensors), a hub
id, or ``default`` (the embedded SmolLM2-135M-Instruct). dtype and device are chosen for the machine
unless given; 8-/4-bit loading goes through bitsandbytes on CUDA; remote code runs only when asked.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zhtune.config.args import ModelArgs
from zhtune.deps import require
from zhtune.errors import ConfigError, MissingDependency
from zhtune.model import default as default_model

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class Source:
    kind: str  # "default" | "gguf" | "local" | "hub"
    path: str  # what from_pretrained gets (a directory or a hub id)
    origin: str  # what the user named


def resolve(name: str, gguf_file: str | None = None, cache_dir: str | None = None) -> Source:
    """Turn --model_name_or_path into something ``from_pretrained`` can read."""
    if name.lower() in default_model.DEFAULT_ALIASES:
        return Source("default", str(default_model.default_model_dir(cache_dir)), name)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return Source("gguf", str(default_model.cached_gguf_dir(p, cache_dir)), name)
    if p.is_dir():
        if gguf_file:
            return Source("gguf", str(default_model.cached_gguf_dir(p / gguf_file, cache_dir)), name)
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source("gguf", str(default_model.cached_gguf_dir(ggufs[0], cache_dir)), name)
            what = (
                f"several .gguf files ({', '.join(g.name for g in ggufs)}); pick one with --gguf_file"
                if ggufs
                else "no config.json"
            )
            raise ConfigError(f"{p} is not a model directory: it has {what}")
        return Source("local", str(p), name)
    if (
        name.startswith((".", "/", "~"))
        or p.suffix in (".gguf", ".safetensors", ".bin")
        or not HUB_ID.match(name)
    ):
        raise ConfigError(
            f"model {name!r} not found: no such file or directory (and it is not a hub id like org/name)"
        )
    return Source("hub", name, name)


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for, but CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local_rank}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def quantization_config(args: ModelArgs, compute_dtype: torch.dtype) -> Any | None:
    """A BitsAndBytesConfig for --load_in_8bit/--load_in_4bit, after checking CUDA and bitsandbytes exist."""
    if not (args.load_in_8bit or args.load_in_4bit):
        return None
    flag = "--load_in_8bit" if args.load_in_8bit else "--load_in_4bit"
    if not torch.cuda.is_available():
        raise ConfigError(f"{flag} needs a CUDA GPU (bitsandbytes quantization); this machine has none")
    require("bitsandbytes", f"{flag}")
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _hub_kwargs(args: ModelArgs, src: Source) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if src.kind == "hub" and args.cache_dir:
        kw["cache_dir"] = str(Path(args.cache_dir) / "hub")
    return kw


def _explain_load_error(e: Exception, src: Source, args: ModelArgs) -> Exception:
    msg = str(e)
    if "trust_remote_code" in msg and not args.trust_remote_code:
        return ConfigError(
            f"{src.origin} ships its own model code; zhtune runs it only with --trust_remote_code "
            "(read the code first)"
        )
    if src.kind == "hub" and isinstance(e, OSError):
        return ConfigError(
            f"could not load {src.origin!r} from the Hugging Face hub ({msg.splitlines()[0]}). "
            "Without network access, download it elsewhere and pass the local directory."
        )
    return e


def _refuse_pickle_only(src: Source, args: ModelArgs) -> None:
    if src.kind != "local" or args.allow_pickle:
        return
    d = Path(src.path)
    if not list(d.glob("*.safetensors")) and (list(d.glob("*.bin")) or list(d.glob("*.pt"))):
        raise ConfigError(
            f"{src.origin} has only pickle (.bin) weights; zhtune reads safetensors unless you pass "
            "--allow_pickle (loading pickle can run code: only for checkpoints you trust)"
        )


def load_tokenizer(args: ModelArgs, src: Source | None = None, *, padding_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    if args.tokenizer_name_or_path:
        tp = Path(args.tokenizer_name_or_path).expanduser()
        if tp.is_dir():  # a tokenizer directory need not hold a model
            tsrc = Source("local", str(tp), args.tokenizer_name_or_path)
        else:
            tsrc = resolve(args.tokenizer_name_or_path, cache_dir=args.cache_dir)
    else:
        tsrc = src or resolve(args.model_name_or_path, args.gguf_file, args.cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(tsrc.path, **_hub_kwargs(args, tsrc))
    except Exception as e:  # noqa: BLE001 - re-raised with an explanation
        raise _explain_load_error(e, tsrc, args) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = padding_side
    tok.clean_up_tokenization_spaces = False  # a causal LM's decode must give back its text unchanged
    return tok


def load_model(
    args: ModelArgs,
    src: Source | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    place: bool = True,
) -> Any:
    """Load the model. ``place=False`` leaves it on CPU for a trainer to move."""
    from transformers import AutoModelForCausalLM

    src = src or resolve(args.model_name_or_path, args.gguf_file, args.cache_dir)
    _refuse_pickle_only(src, args)
    device = device or pick_device(args.device)
    dtype = dtype or pick_dtype(args.dtype, device)
    kw: dict[str, Any] = _hub_kwargs(args, src)
    kw["dtype"] = dtype
    if not args.allow_pickle:
        kw["use_safetensors"] = True
    if args.attn_implementation:
        kw["attn_implementation"] = args.attn_implementation
    qcfg = quantization_config(args, dtype)
    if qcfg is not None:
        kw["quantization_config"] = qcfg
        kw["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kw)
    except (MissingDependency, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with an explanation
        raise _explain_load_error(e, src, args) from e
    if place and qcfg is None:
        model.to(device)
    return model


def load(
    args: ModelArgs, *, place: bool = True, dtype: torch.dtype | None = None, padding_side: str = "right"
):
    """Model and tokenizer, the model resized when the tokenizer extends its own (see model.embeddings)."""
    from zhtune.model.embeddings import fit_embeddings

    src = resolve(args.model_name_or_path, args.gguf_file, args.cache_dir)
    tok = load_tokenizer(args, src, padding_side=padding_side)
    model = load_model(args, src, dtype=dtype, place=place)
    fit_embeddings(
        model, tok, model_path=src.path, tokenizer_name=args.tokenizer_name_or_path, init=args.new_token_init
    )
    return model, tok


def check_vocab(model: Any, tok: Any, args: ModelArgs) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        tname = args.tokenizer_name_or_path or args.model_name_or_path
        raise ConfigError(
            f"the tokenizer ({tname}) has {len(tok)} tokens but the model ({args.model_name_or_path}) has only "
            f"{rows} embedding rows: resize the model for this vocabulary (zhtune pt/sft do this when the "
            "tokenizer is an extension of the base one) or pass the model's own tokenizer"
        )
