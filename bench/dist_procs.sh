#!/usr/bin/env bash
# 1 vs 2 processes on this machine, same global batch 8: the demo model at 192 px, float stage,
# one epoch of 8 iterations, loader in the main process. Run from the repository root:
#     bash bench/dist_procs.sh [OMP threads of the 1-process run, default 2]
# img/s is the trainer's own epoch figure (global images / epoch seconds, startup excluded).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HAT=$ROOT/.venv/bin/hat
T1=${1:-2}
SCRATCH=$(mktemp -d)
cp -r "$ROOT/recipes" "$SCRATCH/"
cd "$SCRATCH"
COMMON=(--stage float --set data.train.source.num_images=64 --set data.train.num_workers=0
        --set stages.float.epochs=1 --set stages.float.max_iters_per_epoch=8
        --set stages.float.log_interval=0)
for rep in 1 2; do
  rm -rf runs
  /usr/bin/time -f "1 process, $T1 thread(s): wall %e s" env OMP_NUM_THREADS="$T1" \
      "$HAT" run recipes/demo.toml "${COMMON[@]}" --set data.train.batch_size=8 \
      --set task.work_dir='"runs/p1"' > p1.log 2>&1; tail -1 p1.log
  /usr/bin/time -f "2 processes, 1 thread each: wall %e s" env OMP_NUM_THREADS=1 \
      "$HAT" run recipes/demo.toml "${COMMON[@]}" --nproc 2 --set data.train.batch_size=4 \
      --set task.work_dir='"runs/p2"' > p2.log 2>&1; tail -1 p2.log
  for p in p1 p2; do
    grep '"kind": "epoch"' "runs/$p/float/log.jsonl" | python3 -c "import json,sys
e = json.loads(sys.stdin.read())
print('$p', 'img/s', round(e['img_s'], 2), 'epoch_time', e['epoch_time'], 'loss', round(e['loss'], 4))"
  done
done
rm -rf "$SCRATCH"
