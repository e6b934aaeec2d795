"""Preference-pair files for the tests of zhtune dpo, the crash test and the preference eval."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ZH


def write_pairs(path: Path, n: int = 8) -> Path:
    """Pairs in three layouts (LLaMA-Factory with a multi-turn prompt, messages, prompt/chosen/rejected)."""
    recs = []
    for i in range(n):
        q, good, bad = ZH[i % len(ZH)], ZH[(i + 3) % len(ZH)], ZH[(i + 5) % len(ZH)]
        if i % 3 == 0:
            conv = [
                {"from": "human", "value": "你好"},
                {"from": "gpt", "value": "你好！"},
                {"from": "human", "value": q},
            ]
            recs.append(
                {
                    "conversations": conv,
                    "chosen": {"from": "gpt", "value": good},
                    "rejected": {"from": "gpt", "value": bad},
                }
            )
        elif i % 3 == 1:
            recs.append({"messages": [{"role": "user", "content": q}], "chosen": good, "rejected": bad})
        else:
            recs.append({"prompt": q, "chosen": good, "rejected": bad})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path
