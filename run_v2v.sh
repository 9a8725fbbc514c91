#!/usr/bin/env bash
# The reference's launcher interface: ./run_v2v.sh single|single-wo|pipe [--profile] [--flag value ...]
# Every flag also reads its environment variable (OUTPUT_FOLDER=... STEP=1 ./run_v2v.sh single).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m sdv2_lab.v2v "$@"
