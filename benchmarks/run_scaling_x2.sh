#!/usr/bin/env bash
# Multi-GPU rows at the Llama-3.2-1B and Llama-3.1-8B shapes in one device call on nvidia-h200-x2
# (issue #20): each row of benchmarks/scaling_shapes.py under its own timeout, inside one overall budget
# (a row that no longer fits is skipped and says so), rows gathered into $OUT/rows.json after every row,
# the tails of the rows' logs in $OUT/log.txt, and a compact summary printed at the end.
#
#   bash benchmarks/run_scaling_x2.sh                  # on the device: OUT is set, .whl carried
#   PROFILE=tiny SLOW=4 BUDGET=3000 PY=.venv/bin/python OUT=/tmp/o bash benchmarks/run_scaling_x2.sh  # CPU dry run
#   ONLY="1b-w1-plain 1b-fsdp-w2" bash benchmarks/run_scaling_x2.sh   # only the named rows (a later call's rows)
#
# Afterwards, here: python benchmarks/scaling_rows.py combine <files_at>/rows.json   (or scaling_shapes.py --combine)
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast (KINDS.md)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export SCALING_X2_MARK=$$  # every process a row starts carries it: leftovers are found by it, and only they
PROFILE=${PROFILE:-x2}
BUDGET=${BUDGET:-525}       # seconds for the whole call (the device allows 600 a command)
SLOW=${SLOW:-1}             # rows' time limits x SLOW (a CPU dry run on a busy machine)
PY=${PY:-python3}
OUT=${OUT:-/tmp/scaling-x2-out}
ROWS=/tmp/scaling-x2-rows
START=$(date +%s)
mkdir -p "$OUT"
rm -rf "$ROWS" /tmp/scaling-x2-work
mkdir -p "$ROWS" /tmp/scaling-x2-work
: > "$ROWS/status"

# The Dask runner's wheels: dask, distributed and the five of theirs the image lacks; only these (the folder
# may hold other work's wheels), the first of each name
WHEELS=${WHEELS:-.whl}
if ! $PY -c "import dask.distributed" 2>/dev/null; then
  whl=()
  for n in dask distributed partd locket tblib tornado zict; do
    f=$(ls "$WHEELS"/$n-[0-9]*.whl 2>/dev/null | head -n 1)
    [ -n "$f" ] && whl+=("$f")
  done
  [ ${#whl[@]} -gt 0 ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${whl[@]}" && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'gpus', torch.cuda.device_count())"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

cleanup() {  # processes a killed row left behind (e.g. a rank or Dask worker): only those carrying this call's mark
  $PY - <<'EOF'
import os, signal
mark, me = f"SCALING_X2_MARK={os.environ['SCALING_X2_MARK']}".encode(), os.getpid()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        continue
    if mark in env and int(pid) != me:
        print(f"killing leftover process {pid}")
        os.kill(int(pid), signal.SIGKILL)
EOF
}

collect() { $PY benchmarks/scaling_rows.py collect "$ROWS" --status "$ROWS/status" --out "$OUT/rows.json" "$@"; }

# row NAME MAX_S MIN_S SUBCOMMAND ARGS...: run one row under min(MAX_S, what the budget has left)
row() {
  local name=$1 max=$(( $2 * SLOW )) min=$(( $3 * SLOW )) t s rc
  shift 3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  t=$(( $(left) - 20 ))  # room for the last collect
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt "$min" ]; then
    echo "$name: skipped, ${t}s of the budget left (needs ${min}s)"
    echo "$name 125 0" >> "$ROWS/status"
    return
  fi
  s=$(date +%s)
  timeout -k 5 "$t" $PY benchmarks/scaling_shapes.py "$@" --name "$name" --out "$ROWS/$name.json" > "$ROWS/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - s ))" >> "$ROWS/status"
  echo "== $name rc=$rc $(( $(date +%s) - s ))s (limit ${t}s)"
  { echo "== $name rc=$rc"; tail -n 25 "$ROWS/$name.log"; } >> "$OUT/log.txt"
}

after() { cleanup; collect --quiet; }

if [ "$PROFILE" = tiny ]; then  # the same rows at a toy shape on the CPU: checks the script, not the numbers
  S1="--shape tiny --seq 64"; S8="--shape tiny --seq 64"; B1=2; T1=3; B8=1; L8=4; SEQS=8; BB=2; BS=3; FAN="--seq 64 --candidates 6"
else
  S1="--shape llama-3.2-1b --seq 2048"; S8="--shape llama-3.1-8b --seq 2048"; B1=8; T1=6; B8=2; L8=4; SEQS=32; BB=8; BS=16
  FAN="--seq 512 --candidates 32"
fi

# 1. the 1B step on one GPU (chunked KD loss): DDP's baseline
row 1b-w1-chunk 110 60 e2e $S1 --per-gpu-batch $B1 --kd-chunk 4096 --nproc 1 --profile --steps $T1; after
# 2. 1B under DDP on 2 GPUs, same per-GPU batch
row 1b-ddp-w2 110 60 e2e $S1 --per-gpu-batch $B1 --kd-chunk 4096 --parallel ddp --nproc 2 --profile --steps $T1; after
# 3. the whole 8B student under FSDP2 over 2 GPUs (one GPU cannot hold its 128 GB of training state)
row 8b-fsdp-w2 210 120 e2e $S8 --per-gpu-batch $B8 --parallel fsdp --checkpointing --nproc 2 --profile --steps 3; after
# 4-5. blockwise at the 8B width: 4 blocks on 1 GPU, then 2 per GPU
row 8b-bw-w1 120 60 blockwise $S8 --layers $L8 --seqs $SEQS --batch $BB --block-steps $BS --nproc 1 --work /tmp/scaling-x2-work/bw1
rm -rf /tmp/scaling-x2-work/bw1; after
row 8b-bw-w2 110 50 blockwise $S8 --layers $L8 --seqs $SEQS --batch $BB --block-steps $BS --nproc 2 --work /tmp/scaling-x2-work/bw2
rm -rf /tmp/scaling-x2-work/bw2; after
# 6. search candidates of the 1B shape through the Dask runner: 1 worker, then one per GPU
row 1b-fanout 160 80 fanout $S1 $FAN --val-seqs 8 --workers 1,2 --work /tmp/scaling-x2-work/fan
rm -rf /tmp/scaling-x2-work/fan; after
# 7-8. 1B under FSDP2 against one GPU on the plain KD loss (train_kd's loss under FSDP); last: DDP is the
#      1B path, this says what sharding costs there
row 1b-w1-plain 100 50 e2e $S1 --per-gpu-batch $B1 --kd-chunk 0 --nproc 1 --profile --steps $T1; after
row 1b-fsdp-w2 110 50 e2e $S1 --per-gpu-batch $B1 --parallel fsdp --nproc 2 --profile --steps $T1; after
# 9-10. blockwise at the 8B width with 4x the blocks: the fixed part (teacher walk, start-up, exchange) is
#       spread over more blocks, so the per-GPU rate nears the 1-GPU one (rows 4-5 measured 76% at 4 blocks)
row 8b-bw16-w1 220 120 blockwise $S8 --layers $((L8 * 4)) --seqs $SEQS --batch $BB --block-steps $BS --nproc 1 --work /tmp/scaling-x2-work/bw1
rm -rf /tmp/scaling-x2-work/bw1; after
row 8b-bw16-w2 140 70 blockwise $S8 --layers $((L8 * 4)) --seqs $SEQS --batch $BB --block-steps $BS --nproc 2 --work /tmp/scaling-x2-work/bw2
rm -rf /tmp/scaling-x2-work/bw2; after

echo "== summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
collect
