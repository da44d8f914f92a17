#!/usr/bin/env bash
# One row of the dense-set ablation (bench/RESULTS-fcos.md): train the float stage of
# recipes/dense.toml with the code of COMMIT, niced, and print its metrics.
#   bench/fcos_dense_row.sh COMMIT NAME [--set KEY=VALUE]...
# The recipe is this checkout's; the commit is checked out in /tmp/fcos-abl/NAME (a git worktree) and imported ahead of this
# checkout's editable installs (PYTHONPATH); data and runs stay in this checkout.
set -euo pipefail
commit=$1; name=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
tree=/tmp/fcos-abl/$name
if [ ! -d "$tree" ]; then
  mkdir -p /tmp/fcos-abl
  git -C "$here" worktree add --detach "$tree" "$commit" >/dev/null
fi
ln -sfn "$here/tmp_data" "$tree/tmp_data"
export PYTHONPATH="$tree:$tree/plugins/hat-coco:$tree/plugins/hat-fcos:$tree/plugins/hat-bpu"
cd "$tree"
start=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nice -n 10 "$here/.venv/bin/hat" run "$here/recipes/dense.toml" --stage float \
  --set "task.work_dir=\"$here/runs/abl-$name\"" "$@"
echo "row $name ($commit): float stage $(( $(date +%s) - start )) s wall"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nice -n 10 "$here/.venv/bin/hat" predict "$here/recipes/dense.toml" \
  --stage float --set "task.work_dir=\"$here/runs/abl-$name\"" "$@"
"$here/.venv/bin/python" - "$here/runs/abl-$name" <<'PY'
import json, sys
run = sys.argv[1]
m = json.load(open(f"{run}/float/metrics.json"))["train"]["last"]
ap = json.load(open(f"{run}/predict/float/metrics.json"))["bbox"]
row = {k: round(100 * ap[k], 2) for k in ("AP", "AP50", "APs", "APm")}
row.update({k: round(m[k], 3) for k in ("img_s", "loss", "loss_cls", "loss_bbox", "loss_centerness")})
print(json.dumps(row))
PY
