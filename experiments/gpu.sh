#!/usr/bin/env bash
# One entry point for the device calls, from the repo root:  bash experiments/gpu.sh SUITE [args]
#   bash experiments/gpu.sh --list      every suite with its one-line description
# A suite is experiments/gpu_suites/SUITE.sh: its first line is its description; it is sourced after
# gpu_common.sh (wheels, environment, the GPU, `step NAME SECONDS cmd` inside BUDGET), sets its BUDGET and
# runs its steps. Results go to $OUT (default /tmp/out). experiments/gpu_wheels.sh builds what is carried.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
SUITES=$HERE/gpu_suites
list() {
  for f in "$SUITES"/*.sh; do printf '%-14s %s\n' "$(basename "$f" .sh)" "$(sed -n '1s/^# *//p' "$f")"; done
}
case "${1:-}" in
  --list|-l) list; exit 0 ;;
  ""|-h|--help) echo "usage: bash experiments/gpu.sh SUITE [args] | --list"; list; exit 2 ;;
esac
SUITE=$1; shift
if [ ! -f "$SUITES/$SUITE.sh" ]; then
  echo "gpu.sh: unknown suite '$SUITE' (no experiments/gpu_suites/$SUITE.sh); the suites are:" >&2
  list >&2; exit 2
fi
BUDGET=${BUDGET:-560}     # a suite sets its own (from its *_BUDGET variable); step reads it when it runs
source "$HERE/gpu_common.sh"
source "$SUITES/$SUITE.sh"
