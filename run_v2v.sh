#!/usr/bin/env bash
# The reference's launcher interface: ./run_v2v.sh single|single-wo|pipe [--device cpu] [--flag value ...]
# Every flag also reads its environment variable (OUTPUT_FOLDER=... STEP=1 ./run_v2v.sh single).
# Paths are taken from the directory you run it in (no cd): --video_path in.mp4 is ./in.mp4.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"
else PY=python3; fi
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m sdv2_lab.v2v "$@"
