"""The files the README's commands read, built small, for tests/test_readme.py.

Each README path (``out/sft``, ``path/to/llama-7b-hf``, ``sharegpt.json`` ...) maps to a builder of a tiny
stand-in: a tiny random Llama for a model, a LoRA adapter made with peft on it, a few Chinese records for a data
file. :class:`Places` builds each one once per session, on first use, and copies it into a command's working
directory at the path the README names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import ZH, make_tiny_model, write_alpaca
from eval_data import write_ceval
from extended_vocab import extend, made_up_chinese
from lora_helpers import make_adapter
from pref_helpers import write_pairs

TARGETS = ["q_proj", "v_proj"]


def conversations(n: int = 10, html: bool = False, copies: int = 0) -> list[dict]:
    """ShareGPT records in Chinese; ``html``: answers in HTML, as scraped ShareGPT has them; ``copies``: that
    many records again under new ids (duplicates for dedup to find)."""
    out = []
    for i in range(n):
        answer = ZH[(i + 1) % len(ZH)]
        if html:
            answer = (
                f"<p>{answer}</p><pre><code>print({i})</code></pre><ul><li>第一点</li><li>第二点</li></ul>"
            )
        out.append(
            {
                "id": f"c{i}",
                "conversations": [
                    {"from": "human", "value": ZH[i % len(ZH)]},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return out + [{**r, "id": f"{r['id']}-copy"} for r in out[:copies]]


def write_json(path: Path, records: list, lines: bool) -> Path:
    if lines:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


class Places:
    """Builds the README's inputs under ``root`` (once each) and copies them into working directories."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.cache = root / "xdg_cache"  # XDG_CACHE_HOME of the commands: converted GGUF files land here
        self.built: dict[str, Path] = {}
        self.builders = {
            "data/": self.alpaca_dir,
            "recipe.yaml": self.sft_recipe,
            "out/sft": lambda d: make_adapter(self.model, d, seed=1, targets=TARGETS),
            "prompts.jsonl": lambda p: write_json(p, [{"prompt": t} for t in ZH[:3]], lines=True),
            "key.txt": lambda p: p.write_text("sk-readme-test\n") and p,
            "data/peoples_daily/train.txt": lambda p: made_up_chinese(p, n=400, seed=0),
            "data/peoples_daily/heldout.txt": lambda p: made_up_chinese(p, n=20, seed=1),
            "outputs/demo_zh_vocab/bpe": lambda d: self.copy(self.extended() / "v", d),
            "outputs/demo_zh_vocab/tokenizer": lambda d: self.copy(self.extended() / "merged", d),
            "outputs/demo_zh_vocab/stage1": lambda d: make_tiny_model(
                self.extended() / "merged", d, tie=True
            ),
            "path/to/llama-7b-hf": lambda d: self.copy(self.model, d),
            "path/to/pt_lora": self.pt_lora,
            "path/to/sft_lora": self.sft_lora,
            "path/to/chinese-llama-plus-lora-7b": lambda d: self.copy(self.get("path/to/pt_lora"), d),
            "path/to/chinese-alpaca-plus-lora-7b": lambda d: self.copy(self.get("path/to/sft_lora"), d),
            "merged": lambda d: self.copy(self.model, d),
            "path/to/ceval-exam": write_ceval,
            "gguf/merged-q8_0.gguf": self.gguf,
            "reviews.jsonl": self.sentiment_task,
            "sharegpt.json": lambda p: write_json(p, conversations(), lines=False),
            "a.json": lambda p: write_alpaca(p, n=6),
            "b.jsonl": lambda p: write_json(p, conversations(4), lines=True),
            "sharegpt_html.json": lambda p: write_json(p, conversations(html=True), lines=False),
            "dpo_zh_demo.json": lambda p: write_pairs(p, n=64),  # --held_out_pairs 60 leaves 4 to train on
            "out/dpo": lambda d: make_adapter(self.model, d, seed=4, targets=TARGETS),
            "out/dpo/heldout_pairs.jsonl": lambda p: write_pairs(p, n=6),
            "tasks.jsonl": self.grpo_tasks,
        }
        for name in ("clean.jsonl", "zh.jsonl", "norm.jsonl", "good.jsonl", "dedup.jsonl", "split.jsonl"):
            self.builders[name] = lambda p: write_json(p, conversations(copies=2), lines=True)

    def __contains__(self, name: str) -> bool:
        return name in self.builders

    def get(self, name: str) -> Path:
        if name not in self.built:
            out = self.root / "built" / name.rstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            self.builders[name](out)
            assert out.exists(), f"the builder of {name} made nothing"
            self.built[name] = out
        return self.built[name]

    def place(self, name: str, cwd: Path) -> None:
        src, dst = self.get(name), cwd / name.rstrip("/")
        if dst.exists():
            return
        self.copy(src, dst)

    @staticmethod
    def copy(src: Path, dst: Path) -> Path:
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return dst

    # ---- builders that others share ----
    def extended(self) -> Path:
        """The tiny model's tokenizer + a Chinese vocabulary, by zhtune vocab train and merge (``v``, ``merged``)."""
        work = self.root / "extended"
        if not (work / "merged").is_dir():
            work.mkdir(parents=True, exist_ok=True)
            extend(self.model, work)
        return work

    def alpaca_dir(self, d: Path) -> Path:
        d.mkdir(parents=True)
        return write_alpaca(d / "alpaca.json", n=16)

    def sft_recipe(self, p: Path) -> Path:
        data = write_alpaca(p.parent / "recipe_data.json", n=16)
        recipe = {
            "model": {"model_name_or_path": str(self.model)},
            "data": {"train_files": [str(data)], "template": "alpaca"},
            "train": {"output_dir": "out/recipe", "per_device_train_batch_size": 4, "report_to": "none"},
        }
        p.write_text(json.dumps(recipe, indent=1), encoding="utf-8")  # JSON is YAML
        return p

    def pt_lora(self, d: Path) -> Path:
        return make_adapter(self.model, d, seed=2, targets=TARGETS)

    def sft_lora(self, d: Path) -> Path:
        return make_adapter(
            self.model, d, seed=3, targets=TARGETS, base_adapters=[self.get("path/to/pt_lora")]
        )

    def gguf(self, p: Path) -> Path:
        from zhtune.export.export import main as export

        info = export(
            {"model_name_or_path": str(self.model), "output_dir": str(p.parent / "gguf_out"), "quant": "q8_0"}
        )
        return shutil.copy2(info["path"], p)

    def sentiment_task(self, p: Path) -> Path:
        reviews = [(ZH[1], "正面"), (ZH[2], "负面"), (ZH[4], "正面"), ("质量太差，不推荐。", "负面")] * 2
        recs = [{"instruction": f"这条评论的情感是正面还是负面？\n{t}", "output": y} for t, y in reviews]
        return write_json(p, recs, lines=True)

    def grpo_tasks(self, p: Path) -> Path:
        """Records whose 'task' picks their reward in --task_rewards: sentiment labels and NER items."""
        ner = "人名：江泽民；地名：北京；机构名：无"
        recs = [
            {
                "instruction": "这条评论是正面还是负面？",
                "input": ZH[1],
                "output": "正面",
                "task": "sentiment",
            },
            {
                "instruction": "这条评论是正面还是负面？",
                "input": "质量太差。",
                "output": "负面",
                "task": "sentiment",
            },
            {"instruction": "找出人名和地名。", "input": "江泽民在北京", "output": ner, "task": "ner"},
            {"instruction": "找出人名和地名。", "input": "江泽民到了北京", "output": ner, "task": "ner"},
        ]
        return write_json(p, recs, lines=True)
