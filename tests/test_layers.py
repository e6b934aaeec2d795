"""Imports run one way: down the layers of the package, never up, and no two modules import each other.

The layers follow the data flow. A package may import its own modules and those of any lower layer;
importing a package of the same or a higher layer fails here, naming the file and line. Lazy imports
inside functions count too: a cycle through a function body is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zhtune

# lowest first; packages on one line share a layer and may not import each other
LAYERS = [
    ("__init__", "errors"),
    ("atomic", "deps"),
    ("config",),
    ("commands",),
    ("text",),  # the conversation core: templates, encoding, record readers, format writers, documents
    ("model",),
    ("score",),  # window NLL, bits per character, label likelihood, the chunked loss
    ("vocab", "infer", "train", "demo"),
    ("export", "eval", "data"),
    ("merge", "serve"),
    ("pipeline",),
    ("recipes", "studio"),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
ROOT = Path(zhtune.__file__).parent


def imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zhtune"):
            if node.module == "zhtune":  # from zhtune import x: x is a module, or a name of __init__
                out += [
                    (f"zhtune.{a.name}" if is_module(a.name) else "zhtune", node.lineno) for a in node.names
                ]
            else:
                out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("zhtune.")]
    return out


def is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def test_every_package_has_a_layer():
    tops = {top(m) for m in modules() if m != "zhtune"}
    assert tops <= set(RANK), f"add these to LAYERS in {__file__}: {sorted(tops - set(RANK))}"


def test_imports_run_down_the_layers():
    wrong = []
    for mod, path in sorted(modules().items()):
        here = top(mod) if mod != "zhtune" else "__init__"
        for target, line in imports(path):
            there = top(target)
            if there == here or target == "zhtune":
                continue
            if RANK[there] >= RANK[here]:
                wrong.append(
                    f"{path.relative_to(ROOT.parent)}:{line}: {here} (layer {RANK[here]}) imports {target}"
                )
    assert not wrong, "imports that run up or across the layers:\n" + "\n".join(wrong)


def test_no_two_modules_import_each_other():
    mods = modules()
    edges = set()
    for mod, path in mods.items():
        for target, _ in imports(path):
            if target in mods and target != mod:
                edges.add((mod, target))
    circles = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not circles, f"modules that import each other: {circles}"


def test_the_checks_catch_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from zhtune.pipeline.run import main\n")
    assert imports(bad) == [("zhtune.pipeline.run", 2)]
    assert RANK[top("zhtune.pipeline.run")] > RANK["text"]
