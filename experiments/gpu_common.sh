# Sourced by experiments/gpu.sh before a suite (experiments/gpu_suites/*.sh): install the carried wheels, set the
# environment, print the GPU, and `step NAME SECONDS command...`, which runs a command under its own limit inside
# the suite's BUDGET, writes $OUT/NAME.txt as it goes and is skipped when the budget cannot hold it.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 5))
  [ "$left" -lt 20 ] && { echo "=== $name: skipped (budget)"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name [${SECONDS}s, limit ${limit}s]"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "exit $?" >> "$OUT/$name.txt"
  grep -E '^\||PASS|FAIL|^exit|Error' "$OUT/$name.txt" | tail -40
}
