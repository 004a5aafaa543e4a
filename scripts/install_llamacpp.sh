#!/usr/bin/env bash
# llama.cpp (llama-cpp-python) for the benchmark peers, built from source for this CPU (~5-10 min).
# Not part of the default set-up: only `pcmoe bench` needs it.
#
# The build uses this CPU's AVX / AVX-512 extensions but never AMX: on the Xeon machines of this
# project an AMX build (GGML_NATIVE=ON) dies with a general protection fault in libggml-cpu as soon
# as a q8_0 / q4_K_M GGUF is evaluated (bf16 runs), so the instruction sets are listed explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
CMAKE_ARGS+=" -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
CMAKE_ARGS+=" -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f)"
CMAKE_ARGS+=" -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)"
CMAKE_ARGS+=" -DGGML_AVX512_BF16=$(has avx512_bf16)"
export CMAKE_ARGS PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
echo "building llama-cpp-python $VERSION with $CMAKE_ARGS" >&2
.venv/bin/pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$VERSION"
.venv/bin/pip install -q "llama-cpp-python==$VERSION"   # its pure-Python dependencies, if missing
