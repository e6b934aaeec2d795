"""Write a LLaMA-architecture GGUF file (f16, q8_0 or q4_0) one tensor at a time.

The header, metadata and tensor table are written first, from shapes alone; then each tensor is read,
permuted, converted or quantized (``gguf.quants``) and appended, so peak memory stays near one tensor
plus whatever the source itself maps. The file is written under a temporary name and renamed when whole.

Conventions llama.cpp expects of llama-architecture weights:

* Q and K projections are stored with each head's rotary halves interleaved: HF keeps the first and
  second half of a head's dimensions apart (``rotate_half``), GGML rotates adjacent pairs. Rows of head
  ``h`` are reordered from ``[h, half, d]`` to ``[h, d, half]`` (K uses the key/value head count).
* 1-D tensors (norms, biases) stay float32; ``f16`` stores matrices as float16; ``q8_0``/``q4_0`` quantize
  matrices in blocks of 32 along a row (rows not a multiple of 32 fall back to float16). With ``q4_0`` the
  output projection (``output.weight``, or ``token_embd.weight`` when it doubles as the output) is kept in
  q8_0: it is the most sensitive matrix, and gguf-py cannot write the Q6_K llama.cpp's quantizer uses there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zhtune.atomic import tmp_sibling
from zhtune.deps import require
from zhtune.errors import ConfigError
from zhtune.export.gguf_vocab import Vocab, add_to_writer

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
QUANTS = ("f16", "q8_0", "q4_0")


@dataclass
class TensorPlan:
    src: str  # name in the source
    dst: str  # GGUF name
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: reorder rotary halves with this many heads


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export writes the llama architecture; this model is {arch} (supported: {', '.join(ARCHITECTURES)})"
        )
    if config.get("sliding_window") not in (None, 0) and arch == "MistralForCausalLM":
        raise ConfigError(
            "a Mistral model with sliding-window attention has no llama-architecture GGUF equivalent"
        )
    n_head = config["num_attention_heads"]
    hidden = config["hidden_size"]
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return {
        "n_layer": config["num_hidden_layers"],
        "n_head": n_head,
        "n_head_kv": config.get("num_key_value_heads") or n_head,
        "hidden": hidden,
        "ffn": config["intermediate_size"],
        "head_dim": config.get("head_dim") or hidden // n_head,
        "ctx": config.get("max_position_embeddings", 2048),
        "eps": config.get("rms_norm_eps", 1e-6),
        "theta": float(theta),
        "rope": rope,
    }


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotary layout -> GGML's: within each head, interleave the two halves of the dimensions."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def choose_type(gguf: Any, dst: str, shape: tuple[int, ...], quant: str, tied: bool) -> Any:
    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    if quant == "f16":
        return T.F16
    q = T.Q8_0 if quant == "q8_0" else T.Q4_0
    if quant == "q4_0" and (dst == "output.weight" or (tied and dst == "token_embd.weight")):
        q = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[q][0]
    return q if shape[-1] % block == 0 else T.F16


def plan_tensors(
    gguf: Any, names: list[str], shapes: dict, hp: dict, quant: str, tied: bool
) -> list[TensorPlan]:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["n_layer"])
    plans = []
    for name in names:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        dst = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if dst is None:
            raise ConfigError(
                f"tensor {name} has no llama-architecture GGUF name; is this a LLaMA-family model?"
            )
        shape = tuple(shapes[name])
        heads = 0
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = hp["n_head"]
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = hp["n_head_kv"]
        plans.append(TensorPlan(name, dst, shape, choose_type(gguf, dst, shape, quant, tied), heads))
    return plans


def _nbytes(gguf: Any, shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], int]:
    """Byte shape and size of a tensor stored as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return byte_shape, int(np.prod(byte_shape))


def encode(gguf: Any, w: torch.Tensor, qtype: Any) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    a = w.detach().to(torch.float32).numpy()
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def write_gguf(
    tensors: Any,
    config: dict[str, Any],
    vocab: Vocab,
    path: str | Path,
    *,
    quant: str = "f16",
    name: str = "model",
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``tensors`` (an object with ``names``, ``shapes``, ``tied`` and ``get(name)``) as GGUF at ``path``."""
    gguf = require("gguf", "writing GGUF files")
    if quant not in QUANTS:
        raise ConfigError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    hp = hparams(config)
    rows = len(vocab.tokens)
    plans = plan_tensors(gguf, tensors.names, tensors.shapes, hp, quant, tensors.tied)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)

    w = gguf.GGUFWriter(path=None, arch="llama")
    w.add_name(name)
    w.add_context_length(hp["ctx"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["n_layer"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_rope_freq_base(hp["theta"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["n_head"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    rope_type = hp["rope"].get("rope_type") or hp["rope"].get("type") or "default"
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["rope"]["factor"]))
    elif rope_type not in ("default", None):
        raise ConfigError(
            f"rope scaling {rope_type!r} is not supported by zhtune's GGUF export (only linear)"
        )
    w.add_vocab_size(rows)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    w.add_file_type(ftype.get(quant, gguf.LlamaFileType.MOSTLY_Q4_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_to_writer(w, vocab)

    for p in plans:
        byte_shape, nbytes = _nbytes(gguf, p.shape, p.qtype)
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(p.dst, p.shape, np.dtype(dt), nbytes)
        else:
            w.add_tensor_info(p.dst, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=p.qtype)

    from tqdm.auto import tqdm

    total = sum(_nbytes(gguf, p.shape, p.qtype)[1] for p in plans)
    counts: dict[str, int] = {}
    try:
        w.open_output_file(tmp)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"GGUF {quant}", disable=not progress) as bar:
            for p in plans:
                t = tensors.get(p.src)
                if p.permute_heads:
                    t = permute_rotary(t, p.permute_heads)
                data = encode(gguf, t, p.qtype)
                del t
                w.write_tensor_data(data)
                bar.update(data.nbytes)
                counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
                del data
        w.flush()
        for f in w.fout or []:
            os.fsync(f.fileno())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": counts, "vocab": rows, "quant": quant}
