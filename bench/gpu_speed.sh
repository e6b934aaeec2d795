#!/usr/bin/env bash
# Training speed and memory on one GPU machine, in one call of at most ~9.5 minutes (issue 17):
# HF+PEFT, HF+PEFT+Liger, unsloth and zhtune on the same random weights and batches (bench/train_speed.py),
# then the fused-LoRA GPU tests (tests/test_fused_lora.py -m gpu: 4-bit base exact in float32, bf16 as
# accurate as peft).
#
# Runs from the repository root with the wheels and assets of bench/carry_wheels.sh in .carry/ (carry it).
# The machine has torch, transformers, peft and accelerate; the wheels go to /tmp/site with --no-deps.
#   bench/gpu_speed.sh [CASES] [SECONDS]
# CASES: comma separated, in the order of priority train_speed.py keeps anyway (default: all of them, 7B
# seq 2048 on every column first); SECONDS: the whole call's allowance (default 560). What does not fit is
# recorded as skipped; a second call can take the rest, e.g.
#   bench/gpu_speed.sh longest_seq,1b_s2048,7b_sft_real,7b_v49953
# Outputs: bench/results/gpu_speed/ (train_speed.json with every record, table.md, log.txt, tests.txt) and the
# same files in $OUT when it is set. One failing column, case or test is recorded; the script goes on.
set -uo pipefail
T0=$(date +%s)
CASES=${1:-7b_s2048,7b_s2048_gc,7b_qlora_s2048,longest_seq,1b_s2048,7b_sft_real,7b_v49953}
ALLOW=${2:-560}
CARRY=${CARRY:-.carry}
RES=${RES:-bench/results/gpu_speed}
PY=${PY:-python3}      # the GPU machine's python3 holds torch
EXTRA=${EXTRA:-}       # more train_speed.py arguments (--tiny: the CPU dry run of this script)
TESTS=${TESTS:-1}      # 0: leave out the GPU tests at the end (their 75 s go to the bench)
# zhtune variants beside its defaults (VARIANTS replaces the list): compile = --compile_layers true (in its own
# process; compile+fused after it); nofused = without fused LoRA;
# profile = the defaults again with one step profiled, last in their process (a profiled process runs slower
# afterwards, so the defaults' own figure is never taken from it)
DEFAULT_VARIANTS='[{"tag":"nofused","opts":{"fused_lora":false},"only":["7b_s2048","7b_qlora_s2048"]},
  {"tag":"profile","opts":{},"only":["7b_s2048"]},
  {"tag":"compile","opts":{"use_liger_kernel":false,"compile_layers":true},"only":["7b_s2048","1b_s2048"]},
  {"tag":"compile+fused","opts":{"use_liger_kernel":false,"compile_layers":true,"fused_lora":true},"only":["7b_s2048"]}]'

mkdir -p "$RES"
LOG="$RES/log.txt"
: >"$LOG"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - T0)); }

say "installing $(ls "$CARRY"/wheels/*.whl | wc -l) wheels"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$CARRY"/wheels/*.whl >>"$LOG" 2>&1 || say "pip install failed (rc $?): columns that need a missing package will say so"
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1  # no network there
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
from importlib.metadata import version
import sys
print("python", sys.version.split()[0])
for n in ("torch", "transformers", "peft", "accelerate", "triton", "bitsandbytes", "liger-kernel", "unsloth",
          "unsloth_zoo", "trl", "datasets"):
    try:
        print(n, version(n))
    except Exception as e:
        print(n, "missing", type(e).__name__)
import zhtune; print("zhtune from", zhtune.__file__)
EOF

# the tests get the last ~75 s; the bench the rest, with 100 s of grace for a case started near its budget
BENCH_END=$((ALLOW - 75 * TESTS))
BUDGET=$((BENCH_END - $(elapsed) - 100))
say "bench: budget ${BUDGET}s (hard stop at ${BENCH_END}s of the call), cases $CASES"
timeout --signal=TERM --kill-after=10 $((BENCH_END - $(elapsed))) $PY bench/train_speed.py \
  --out "$RES" --sp_model "$CARRY/assets/llama2_sp32k.model" \
  --data "$CARRY/assets/alpaca_zh_demo.json,$CARRY/assets/sharegpt_dummy_conversation.json" \
  --cases "$CASES" --budget "$BUDGET" --grace 100 --work /tmp/zhtune_bench --profile 7b_s2048 \
  --variants "${VARIANTS:-$DEFAULT_VARIANTS}" \
  $EXTRA 2>&1 | tee -a "$LOG"
say "bench ended (rc ${PIPESTATUS[0]}) at $(elapsed)s"
if [ -f "$RES/train_speed.json" ]; then
  $PY bench/train_speed.py --out "$RES" --sp_model - --data - --table_only >/dev/null 2>>"$LOG" \
    || say "table.md could not be written"
fi

if [ "$TESTS" != 0 ]; then
  say "fused-LoRA and FP8 GPU tests"
  timeout 70 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_lora.py tests/test_fp8.py -rs >"$RES/tests.txt" 2>&1
  say "tests rc $? at $(elapsed)s: $(tail -1 "$RES/tests.txt")"
fi

if [ -n "${OUT:-}" ]; then
  for f in train_speed.json table.md log.txt tests.txt; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"
  done
fi
say "done in $(elapsed)s"
cat "$RES/table.md" 2>/dev/null
exit 0
