#!/usr/bin/env bash
# Fetch (here, where pip reaches the registry) the wheels the GPU box lacks, into .whl/ (git-ignored), and the
# reference's bench files into .refbench/; every GPU script installs .whl/*.whl with gpu_common.sh.
#   bash experiments/gpu_wheels.sh     then carry [".whl", ".refbench"] in the device call
# Versions are this project's venv's (.venv/bin/pip freeze), for Python 3.12 on x86-64 (the GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .refbench
PIP=${PIP:-.venv/bin/pip}
ver() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pkgs=()
for p in hydra-core omegaconf av ftfy wcwidth fastapi starlette pydantic pydantic_core annotated-types \
         typing-inspection annotated-doc uvicorn websockets diffusers importlib_metadata sniffio opentelemetry-api; do
  v=$(ver "$p"); [ -n "$v" ] && pkgs+=("$p==$v") || echo "not in the venv: $p" >&2
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}" streamdiffusionv2==0.1.1
# antlr4-python3-runtime (omegaconf's parser) is published as a source archive only: build its wheel here
[ -n "$(ls .whl/antlr4_python3_runtime-*.whl 2>/dev/null)" ] || \
  "$PIP" wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
[ -n "${TORCHAO:-}" ] && "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "torchao==$TORCHAO"
cp ../shared/bench/ref_bench.py ../shared/bench/ref_pipe_bench.py ../shared/bench/dit_floor.py ../shared/bench/vae_conv_floor.py ../shared/bench/vae_floor.py .refbench/ 2>/dev/null || \
  echo "note: ../shared/bench not found: .refbench/ has no reference bench files" >&2
# PyAV travels in .whl now: the reference bench's stand-in module (no __spec__) would break diffusers' check for it
sed -i 's/^sys.modules.setdefault("av", types.ModuleType("av")).*/import av  # noqa: F401  (PyAV is carried in .whl)/' \
  .refbench/ref_bench.py .refbench/ref_pipe_bench.py 2>/dev/null || true
du -sh .whl .refbench
