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
    "vllm": ("", "vllm"),
}


def install_hint(name: str) -> str:
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
