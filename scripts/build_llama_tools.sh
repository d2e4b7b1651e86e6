#!/usr/bin/env bash
# Build llama.cpp's command-line tools llama-quantize, llama-imatrix and llama-perplexity from exactly
# the llama.cpp source that the pinned llama-cpp-python vendors (requirements.lock), so the tools and the
# Python runtime Tailor tests against share one ggml (same quantizers, same kernels).
#
# Usage: scripts/build_llama_tools.sh [OUT_DIR]        (default .cache/llama-tools)
#   OUT_DIR/bin/llama-{quantize,imatrix,perplexity}     the tools (statically linked against ggml/llama)
#   OUT_DIR/VERSION                                     llama-cpp-python version and the sdist's sha256
# Environment:
#   PYTHON      interpreter whose pip downloads the sdist (default .venv/bin/python, else python3)
#   JOBS        parallel compile jobs (default 2)
#   LLAMA_TOOLS_CMAKE_ARGS  extra cmake arguments (e.g. -DGGML_NATIVE=ON for this CPU's fastest kernels)
#
# Steps: `pip download --no-deps --no-binary :all: llama-cpp-python==<pinned>` into a temp dir (pip's
# usual index configuration), unpack, configure vendor/llama.cpp with tools on and everything else off
# (no server, tests, examples, network), build only the three targets, copy them out. GGML_NATIVE is
# off by default, like llama-cpp-python's own build here (-march=x86-64), so the tools run on any
# x86-64 host; on 2 shared cores the build took ~40 minutes (nice). Re-running rebuilds from scratch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/.cache/llama-tools}" && cd "${1:-$ROOT/.cache/llama-tools}" && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
JOBS="${JOBS:-2}"

VERSION="$(sed -n 's/^llama-cpp-python==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.lock" | head -1)"
if [[ -z "$VERSION" ]]; then
  echo "build_llama_tools: no 'llama-cpp-python==' pin in $ROOT/requirements.lock" >&2
  exit 1
fi
for tool in cmake tar; do
  command -v "$tool" >/dev/null || { echo "build_llama_tools: $tool not found" >&2; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-tools.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "build_llama_tools: llama-cpp-python $VERSION -> $OUT (work dir $WORK)"
"$PY" -m pip download -q --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$WORK/sdist"
SDIST="$(ls "$WORK"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || ls "$WORK"/sdist/*.tar.gz | head -1)"
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$SRC/CMakeLists.txt" ]] || { echo "build_llama_tools: no vendor/llama.cpp in $SDIST" >&2; exit 1; }

# shellcheck disable=SC2086  # LLAMA_TOOLS_CMAKE_ARGS is a list of words on purpose
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF ${LLAMA_TOOLS_CMAKE_ARGS:-} >"$WORK/configure.log" 2>&1 \
  || { tail -30 "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" -j "$JOBS" --target llama-quantize llama-imatrix llama-perplexity \
  >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }

mkdir -p "$OUT/bin"
for t in llama-quantize llama-imatrix llama-perplexity; do
  install -m 0755 "$WORK/build/bin/$t" "$OUT/bin/$t"
done
{
  echo "llama-cpp-python==$VERSION"
  echo "sdist sha256 $(sha256sum "$SDIST" | cut -d' ' -f1)"
} >"$OUT/VERSION"
"$OUT/bin/llama-quantize" --help >/dev/null 2>&1 || true  # prints usage and exits non-zero by design
echo "build_llama_tools: built $(ls "$OUT/bin" | tr '\n' ' ')"
