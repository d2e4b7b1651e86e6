#!/usr/bin/env bash
# Mutation testing of issue 21's core on a many-core machine: the same `mutmut run` as `make mutation`
# (scope and tests in pyproject's [tool.mutmut]), with N children instead of 2, inside one time budget.
#
#   benchmarks/run_mutation_device.sh prepare   here: the wheels the machine lacks into .whl/ (pinned as in
#                                               requirements.lock), ggml's reference libraries into .mutdeps/
#   benchmarks/run_mutation_device.sh           there, from the repo root, with .whl and .mutdeps carried:
#                                               results into $OUT (default reports/bench/device)
#
# Environment: N children (30); TOTAL_S seconds for the whole script (450: mutmut gets what is left after the
# set-up, less 50 s kept for the summary); PY the interpreter (python3); SITE the folder the wheels go to
# (/tmp/site; SKIP_INSTALL=1 uses it as it is); MUTANTS mutmut name patterns to run only those
# ("tailor.quant.f16*"); prepare reads llama-cpp-python from LOCAL_PY (.venv/bin/python).
# Writes mutation.json (benchmarks/mutation.py's summary; a run cut short marks the rest "not checked"),
# survivors.txt (each surviving mutant's diff), mutmut.log (its tail) and mutants-meta.tgz (mutmut's
# per-mutant results, to restore into a regenerated mutants/ here).
set -uo pipefail
cd "${REPO:-$(dirname "$0")/..}"  # REPO: another checkout to prepare (its .whl/, .mutdeps/)
t0=$(date +%s)
PY=${PY:-python3}
# name==version; a wheel already in .whl under that name is kept (one version of each: two stop the install)
SPECS="mutmut==3.8.1 libcst==1.9.0 setproctitle==1.3.8 click==8.5.1 optuna==5.0.0 colorlog==6.12.0 gguf==0.19.0
       pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0"

if [ "${1:-}" = prepare ]; then
  mkdir -p .whl
  for spec in $SPECS; do
    ls .whl/"${spec%%==*}"-*.whl >/dev/null 2>&1 && continue
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$spec" || exit 1
  done
  # The quantiser tests compare with ggml's own C code, loaded from llama-cpp-python's lib/ folder; the
  # machine has no llama-cpp-python, so a stub package of that name carries the two libraries (and the
  # OpenMP runtime they link), found through their $ORIGIN run path.
  lib=$(${LOCAL_PY:-.venv/bin/python} -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / "lib")') || exit 1
  gomp=$(ldconfig -p | awk '/libgomp\.so\.1 .*x86-64/ {print $NF; exit}')
  rm -rf .mutdeps && mkdir -p .mutdeps/llama_cpp/lib
  cp "$lib/libggml-base.so" "$lib/libggml-cpu.so" .mutdeps/llama_cpp/lib/
  cp "$lib/libggml-base.so" .mutdeps/llama_cpp/lib/libggml-base.so.0
  cp -L "$gomp" .mutdeps/llama_cpp/lib/libgomp.so.1
  echo '"""Only ggml'"'"'s libraries from llama-cpp-python (lib/), for the quantiser tests on the device machine."""' \
    > .mutdeps/llama_cpp/__init__.py
  excl="$(git rev-parse --git-common-dir)/info/exclude"
  for d in /.whl/ /.mutdeps/; do grep -qxF "$d" "$excl" || echo "$d" >> "$excl"; done
  du -sh .whl .mutdeps
  exit 0
fi

N=${N:-30}
TOTAL_S=${TOTAL_S:-450}
OUT=${OUT:-$PWD/reports/bench/device}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  wheels=$(for spec in $SPECS; do ls .whl/"${spec%%==*}"-*.whl; done) || { echo "missing wheels: run prepare"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels || exit 1
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1 \
       PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 TOKENIZERS_PARALLELISM=false

# One plain run of the selected tests first (parallel where pytest-xdist is there): mutmut stops at once
# if any fails unmutated, so a test that fails on this machine (another torch or numpy, ggml's libraries
# not loading) is deselected, and a test file that cannot be imported leaves the selection; both are
# listed in the summary's run info. ggml's libraries (.mutdeps) join the path.
extra=
[ -d .mutdeps ] && extra=:$PWD/.mutdeps
sel=$($PY -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]))')
xd=; $PY -c 'import xdist' 2>/dev/null && xd="-n 16"
PYTHONPATH=$PWD:$SITE$extra PYTEST_DISABLE_PLUGIN_AUTOLOAD= timeout 240 $PY -m pytest -q -p no:cacheprovider $xd -rfEs \
  --continue-on-collection-errors --deselect tests/unit/test_gguf_kquants.py::test_real_smollm2_ffn_down $sel \
  > "$OUT/precheck.log" 2>&1
pre=$?
tail -3 "$OUT/precheck.log"
bad=$(grep -E '^(FAILED|ERROR) ' "$OUT/precheck.log" | awk '{print $2}' | sort -u | tr '\n' ' ')
skipped_ggml=$(grep -c 'SKIPPED.*llama_cpp' "$OUT/precheck.log")
$PY - "$bad" <<'PY'
import json, re, sys
bad = sys.argv[1].split()
p = "pyproject.toml"
s = open(p).read()
files = [b for b in bad if "::" not in b]
tests = [b for b in bad if "::" in b and b.split("::")[0] not in files]
m = re.search(r"pytest_add_cli_args_test_selection = (\[.*?\])", s, re.S)
sel = [t for t in json.loads(m.group(1)) if t not in files]
s = s.replace(m.group(0), "pytest_add_cli_args_test_selection = " + json.dumps(sel))
m = re.search(r"pytest_add_cli_args = (\[.*?\])", s, re.S)
args = json.loads(m.group(1)) + [x for t in tests for x in ("--deselect", t)]
s = s.replace(m.group(0), "pytest_add_cli_args = " + json.dumps(args))
open(p, "w").write(s)
print(f"deselected {len(tests)} failing tests, dropped {len(files)} test files")
PY
echo "pre-check rc $pre, $(( $(date +%s) - t0 )) s"

# mutants/ must exist before Python starts, or the import system caches it as absent
rm -rf mutants && mkdir mutants
export PYTHONPATH=$PWD/mutants:$SITE$extra
budget=$(( TOTAL_S - ($(date +%s) - t0) - 50 ))
echo "mutmut: $N children, $budget s"
timeout -s INT -k 30 "$budget" $PY -c 'import sys; from mutmut.__main__ import cli; sys.argv[0] = "mutmut"; cli()' \
  run --max-children "$N" ${MUTANTS:-} > /tmp/mutmut.log 2>&1
rc=$?
tr '\r' '\n' < /tmp/mutmut.log | grep -v '^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]' | tail -c 300000 > "$OUT/mutmut.log"
tail -5 "$OUT/mutmut.log"
wall=$(( $(date +%s) - t0 ))
info="{\"machine\": \"$(nproc --all) cores\", \"children\": $N, \"mutmut_budget_s\": $budget, \"mutmut_rc\": $rc,
       \"timed_out\": $([ $rc = 124 ] && echo true || echo false), \"wall_s_before_summary\": $wall,
       \"precheck_rc\": $pre, \"deselected\": \"$bad\",
       \"ggml_tests_skipped\": $skipped_ggml, \"python\": \"$($PY -c 'import platform; print(platform.python_version())')\"}"
$PY benchmarks/mutation.py --out "$OUT/mutation.json" --diffs "$OUT/survivors.txt" --run-info "$info"
tar czf "$OUT/mutants-meta.tgz" $(find mutants -name '*.meta') mutants/mutmut-stats.json 2>/dev/null
echo "done in $(( $(date +%s) - t0 )) s"
