"""Training speed and memory on one GPU, in one run: HF+PEFT, HF+PEFT+Liger, unsloth and zhtune's defaults.

Cases (LLaMA shapes, random-initialised weights, bf16 base, LoRA r8 alpha 32 dropout 0 on all seven projections):

  7b_s2048        7B (LLaMA-2-7B config), seq 2048, batch 2
  7b_s2048_gc     the same with gradient checkpointing
  7b_qlora_s2048  the same with a 4-bit NF4 base (double quantization, bf16 compute) and checkpointing
  1b_s2048        1.1B (TinyLlama shape), seq 2048, batch 8
  7b_sft_real     7B on the real length distribution of alpaca_zh_demo + the ShareGPT sample, tokenized with
                  the LLaMA-2 tokenizer and zhtune's alpaca template: the HF-loop columns pad batches of 8
                  samples to their longest (DataCollatorForSeq2Seq); zhtune packs rows of 2048 tokens, batch 2.
                  Reported: effective (non-pad) tokens/s.
  7b_v49953       7B, seq 512, batch 8, embed_tokens + lm_head trained in full, a 49,953-token vocabulary
                  (zhtune's vocabulary resize pads it to 50,048 rows, a multiple of 64)
  --longest_seq   the longest sequence a 7B QLoRA trains in --mem_gib GiB (bench/speed_memory.py)

Columns (bench/speed_sides.py says how each is set up): baseline (HF+PEFT), liger (HF+PEFT+Liger), unsloth,
zhtune (defaults), and zhtune variants (--variants). Every column: constant lr 1e-4, no weight decay, no
gradient clipping, the same initial weights and batches (so the first step's loss must agree); each column
runs in its own process (Liger and unsloth patch transformers' Llama classes globally).

Timing (--timing): 3 warm-up steps, then
  step    (default; the method of the results in bench/results) 10 steps each ended by torch.cuda.synchronize()
          (and a loss read), the median step reported;
  window  the same steps timed as one window, synchronised only when it opens and closes.
The real-length case covers 24 steps and reports total real tokens over total time. zhtune's steps are whole
Trainer steps: data loading, collation, the optimizer and callbacks included. ``first_step_s``: the first step
(compilation, autotuning, first allocations). Peak memory: torch.cuda.max_memory_allocated() over the case,
weights included.

MFU = flops per token x tokens/s / peak, peak = the bf16 8192^3 matmul rate measured at the start of the run.
flops per token = 4N + 6 L h s: N = parameters taking part in matmuls (all but the input embedding),
4N = forward 2N + activation-gradient backward 2N (frozen base weights get no weight gradient), 6 L h s =
causal attention forward (2 s h per layer) plus backward (twice that); recomputation under checkpointing and
4-bit dequantization are not counted; +2 V h for the lm_head weight gradient when lm_head trains.

Groups run in priority order (7B seq 2048 on every column first), each column of a group in one process;
--budget skips what would start after that many seconds (recorded as skipped). A failing column is recorded
with its error and the run goes on. Usage:

    python bench/train_speed.py --out DIR --sp_model llama2_sp32k.model \\
        --data alpaca_zh_demo.json,sharegpt_dummy_conversation.json [--cases ...] [--sides ...] [--tiny]
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import speed_common as C

SIDES = ["zhtune", "baseline", "liger", "unsloth"]
LABELS = {"baseline": "HF+PEFT", "liger": "HF+PEFT+Liger", "unsloth": "unsloth", "zhtune": "zhtune",
          "zhtune_offload": "zhtune --gradient_checkpointing_offload"}  # fmt: skip
GROUPS = [
    ["7b_s2048"],
    ["7b_s2048_gc", "7b_qlora_s2048"],
    ["longest_seq"],
    ["1b_s2048", "7b_sft_real", "7b_v49953"],
]


def side_setup(side: str) -> None:
    """What a column's process does before any model exists."""
    if side == "unsloth":
        import unsloth  # noqa: F401 - must come before transformers; patches it for the whole process
    elif side == "liger":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("Liger's Triton kernels need CUDA")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()


def run_one(side: str, name: str, variant: dict) -> dict:
    import speed_sides

    if name == "longest_seq":
        import speed_memory

        return speed_memory.longest_seq(side)
    if side == "zhtune":
        return speed_sides.zhtune_case(name, variant)
    return speed_sides.hf_case(side, name)


def run_side(side: str, cases: list[str], variants: list[dict]) -> None:
    """The body of a column's process: its cases (and zhtune's variants) in order, each one recorded."""
    import torch

    path = Path(C.A.out) / f"{C.A.label or side}.json"
    results = json.loads(path.read_text()) if path.exists() else []
    try:
        side_setup(side)
        setup_error = None
    except Exception as e:  # noqa: BLE001 - every case of this column records it
        setup_error = (f"{type(e).__name__}: {e}"[:1500], traceback.format_exc()[-3000:])
    for v in variants if side == "zhtune" else [{}]:
        if side == "zhtune":  # each variant compiles afresh: no recompile limit carried over from the last
            torch._dynamo.reset()
        for name in cases:
            if name not in v.get("only", [name]):
                continue
            tag = f"[{v['tag']}]" if v.get("tag") else ""
            rec = {"side": side + tag, "case": name, "ok": False}
            t0 = time.time()
            if setup_error:
                rec.update(error=setup_error[0], traceback=setup_error[1])
            elif C.A.budget and time.time() - C.A.t_start > C.A.budget:
                rec["error"] = f"skipped: past the --budget of {C.A.budget:.0f}s"
            else:
                try:
                    rec = run_one(side, name, v)
                except Exception as e:  # noqa: BLE001 - recorded, the next case runs
                    rec.update(
                        error=f"{type(e).__name__}: {e}"[:1500], traceback=traceback.format_exc()[-3000:]
                    )
            rec["wall_s"] = round(time.time() - t0, 1)
            C.log(json.dumps({k: x for k, x in rec.items() if k not in ("traceback", "probes")})[:700])
            results.append(rec)
            path.write_text(json.dumps(results, indent=2))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


CHILD: subprocess.Popen | None = None
STOPPED = False


def stop(signum, frame) -> None:  # noqa: ANN001
    """SIGTERM (the GPU script's time limit): end the running column's process; main writes what is done."""
    global STOPPED
    STOPPED = True
    if CHILD is not None and CHILD.poll() is None:
        CHILD.kill()


def spawn(side: str, label: str, cases: list[str], variants: list[dict]) -> list[dict]:
    """One column's process for ``cases``; its records (or, if the process died, one error per case)."""
    out = Path(C.A.out)
    p = out / f"{label}.json"
    before = len(json.loads(p.read_text())) if p.exists() else 0
    cmd = [sys.executable, __file__, "--side", side, "--label", label, "--cases", ",".join(cases),
           "--variants", json.dumps(variants), "--peak", str(C.A.peak), "--t_start", str(C.A.t_start)]  # fmt: skip
    for k in (
        "out",
        "sp_model",
        "data",
        "profile",
        "timing",
        "budget",
        "grace",
        "work",
        "mem_gib",
        "mem_max_seq",
        "mem_step",
    ):
        cmd += [f"--{k}", str(getattr(C.A, k))]
    cmd += ["--tiny"] if C.A.tiny else []
    left = C.A.budget - (time.time() - C.A.t_start) + C.A.grace if C.A.budget else None
    global CHILD
    CHILD = subprocess.Popen(cmd)
    try:
        rc = CHILD.wait(timeout=left)
        died = f"the process exited with {rc}" if rc else ""
    except subprocess.TimeoutExpired:
        CHILD.kill()
        CHILD.wait()
        died = "the process ran past the budget and was stopped"
    if STOPPED:
        died = "the run was stopped (SIGTERM) during this case"
    CHILD = None
    recs = json.loads(p.read_text())[before:] if p.exists() else []
    done = {(r["side"], r["case"]) for r in recs}
    for v in variants if died else []:
        tagged = side + (f"[{v['tag']}]" if v.get("tag") else "")
        for name in cases:
            if name in v.get("only", [name]) and (tagged, name) not in done:
                recs.append({"side": tagged, "case": name, "ok": False, "error": died})
    return recs


def plan_groups(
    cases: list[str], sides: list[str], variants: list[dict]
) -> list[tuple[str, str, list, list]]:
    """(side, label, cases, variants) per process, in priority order; zhtune variants without Liger apart."""
    plain = [v for v in variants if v.get("opts", {}).get("use_liger_kernel") is False]
    with_liger = [v for v in variants if v not in plain]
    runs = []
    for group in GROUPS:
        want = [c for c in group if c in cases]
        if want == ["longest_seq"]:
            longest = [s for s in C.A.longest_sides.split(",") if s.removesuffix("_offload") in sides]
            runs += [(s, s, want, [{}]) for s in longest]
            continue
        for side in sides if want else []:
            vs = [v for v in with_liger if set(v.get("only", want)) & set(want)] if side == "zhtune" else [{}]
            runs.append((side, side, want, vs))
        vs = [v for v in plain if set(v.get("only", want)) & set(want)]
        if vs and "zhtune" in sides:  # after every column of the group: these variants are extras
            runs.append(("zhtune", "zhtune_noliger", want, vs))
    return runs


def cell(r: dict | None) -> str:
    if r is None:
        return ""
    if not r.get("ok"):
        return "skipped" if "skipped" in r.get("error", "") else f"failed ({r.get('error', '')[:60]})"
    mfu = f", MFU {r['mfu']:.3f}" if "mfu" in r else ""
    return f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_gib']} GiB{mfu}"


def loss_gap(r: dict, base: dict | None) -> str:
    """Largest relative distance of a loss curve from HF+PEFT's, step by step (same batches only)."""
    if (
        not base
        or not base.get("ok")
        or r["case"] == "7b_sft_real"
        or len(r["losses"]) != len(base["losses"])
    ):
        return ""
    return f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'], base['losses'])):.1e}"


def table(recs: list[dict], peak: float) -> str:
    by = {(r["case"], r["side"]): r for r in recs}
    cases = [c for c in C.CASES if any(r["case"] == c for r in recs)]
    lines = [f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s", "",
             "| case | " + " | ".join(LABELS[s] for s in SIDES[1:] + SIDES[:1]) + " | zhtune ÷ HF | ÷ Liger | ÷ unsloth |",
             "| --- " * 8 + "|"]  # fmt: skip
    for c in cases:
        z = by.get((c, "zhtune"))
        ratios = []
        for s in ("baseline", "liger", "unsloth"):
            o = by.get((c, s))
            ok = z and o and z.get("ok") and o.get("ok")
            ratios.append(f"{z['tokens_per_s'] / o['tokens_per_s']:.2f}" if ok else "")
        row = [cell(by.get((c, s))) for s in ("baseline", "liger", "unsloth", "zhtune")]
        lines.append(f"| {c} | " + " | ".join(row + ratios) + " |")
    lines += ["", "| case | column | batch x seq | tok/s | ms/step | peak GiB | MFU | x HF | first loss | loss gap to HF | first step s |",
              "| --- " * 11 + "|"]  # fmt: skip
    for r in recs:
        if r["case"] not in C.CASES:
            continue
        if not r.get("ok"):
            lines.append(f"| {r['case']} | {r['side']} | {r.get('error', '')[:90]} |" + " |" * 8)
            continue
        b = by.get((r["case"], "baseline"))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b and b.get("ok") else ""
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else ""
        unit = " (effective)" if r["case"] == "7b_sft_real" else ""
        lines.append(
            f"| {r['case']} | {r['side']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:,.0f}{unit} | {r['ms_per_step']} "
            f"| {r['peak_gib']} | {mfu} | {ratio} | {r['losses'][0]:.4f} | {loss_gap(r, b)} | {r.get('first_step_s', '')} |"
        )
    mem = [r for r in recs if r["case"] == "longest_seq_7b_qlora" or r["case"] == "longest_seq"]
    if mem:
        lines += ["", "Longest sequence a 7B QLoRA trains (batch 1, one full step) under the memory cap:"]
        for r in mem:
            if r.get("ok"):
                fits = [p for p in r["probes"] if p["fits"]]
                peak_l = fits[-1]["peak_gib"] if fits else ""
                lines.append(f"- {LABELS.get(r['side'], r['side'])}: {r['longest_seq']:,} tokens in {r['mem_gib']} GiB "
                             f"(peak {peak_l} GiB; first failing {r['first_failing_seq']})")  # fmt: skip
            else:
                lines.append(f"- {r['side']}: {r.get('error', '')[:120]}")
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "triton", "bitsandbytes", "liger-kernel",
                 "unsloth", "unsloth_zoo", "trl", "datasets"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sp_model", required=True, help="LLaMA-2 SentencePiece model (llama2_sp32k.model)")
    ap.add_argument(
        "--data", required=True, help="SFT files for the real length distribution, comma separated"
    )
    ap.add_argument("--cases", default=",".join([*C.CASES, "longest_seq"]))
    ap.add_argument("--sides", default=",".join(SIDES), help="columns: zhtune, baseline, liger, unsloth")
    ap.add_argument(
        "--variants", default="default", help="extra zhtune variants: JSON list of {tag, opts, only}"
    )
    ap.add_argument(
        "--longest_sides",
        default="baseline,zhtune,zhtune_offload",
        help="columns of the longest-sequence search (zhtune_offload: zhtune with --gradient_checkpointing_offload)",
    )
    ap.add_argument("--mem_gib", type=float, default=16.0, help="memory cap of the longest-sequence search")
    ap.add_argument("--mem_max_seq", type=int, default=131072)
    ap.add_argument("--mem_step", type=int, default=1024, help="resolution of the longest-sequence search")
    ap.add_argument(
        "--profile",
        default="",
        help="zhtune cases whose 5th step is profiled (kernel time by kind), in the variant tagged 'profile' "
        "only: a profiled process runs slower afterwards, so give that variant last",
    )
    ap.add_argument("--budget", type=float, default=0.0, help="skip what would start after this many seconds")
    ap.add_argument(
        "--grace", type=float, default=100.0, help="a column's process is stopped this long past --budget"
    )
    ap.add_argument("--table_only", action="store_true", help="write table.md from --out's train_speed.json")
    ap.add_argument("--timing", default="step", choices=["step", "window"], help="see the module docstring")
    ap.add_argument("--work", default="", help="where the saved random models go (default: a temp folder)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script's logic)")
    for hidden in ("--side", "--label"):
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    ap.add_argument("--t_start", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    A = C.A = parse()
    A.t_start = A.t_start or time.time()
    out = Path(A.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in A.cases.split(",") if c]
    unknown = set(cases) - set(C.CASES) - {"longest_seq"}
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; known: {', '.join([*C.CASES, 'longest_seq'])}")
    extra = [] if A.variants == "default" else json.loads(A.variants)
    if A.table_only:
        done = json.loads((out / "train_speed.json").read_text())
        t = table(done["results"], done["meta"]["peak_flops"])
        (out / "table.md").write_text(t + "\n")
        print(t)
        return
    if A.side:
        run_side(A.side, cases, extra)
        return
    import torch

    A.peak = C.measure_peak()
    meta = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "peak_flops": A.peak,
            "versions": versions(), "cases": C.CASES, "started": time.strftime("%F %T"), "argv": sys.argv[1:]}  # fmt: skip
    C.log("meta", json.dumps(meta))
    variants = [{}] + [v for v in extra if v.get("tag")]  # zhtune's defaults always run
    recs: list[dict] = []
    sides = [s for s in SIDES if s in A.sides.split(",")]
    signal.signal(signal.SIGTERM, stop)
    for side, label, cs, vs in plan_groups(cases, sides, variants):
        if STOPPED or (A.budget and time.time() - A.t_start > A.budget):
            why = "the run was stopped (SIGTERM)" if STOPPED else f"past the --budget of {A.budget:.0f}s"
            recs += [{"side": side, "case": c, "ok": False, "error": f"skipped: {why}"} for c in cs]
            continue
        C.log(f"== {label}: {', '.join(cs)}")
        recs += spawn(side, label, cs, vs)
        meta["wall_s"] = round(time.time() - A.t_start, 1)
        (out / "train_speed.json").write_text(json.dumps({"meta": meta, "results": recs}, indent=2))
    meta["wall_s"] = round(time.time() - A.t_start, 1)
    (out / "train_speed.json").write_text(json.dumps({"meta": meta, "results": recs}, indent=2))
    t = table(recs, A.peak)
    (out / "table.md").write_text(t + "\n")
    print(t)


if __name__ == "__main__":
    main()
