#!/usr/bin/env bash
# The CUDA path of the demo in a few minutes: fp16 AMP (GradScaler), channels-last, nccl on one
# process (torchrun), SyncBatchNorm conversion; records img/s and the stage table.
#
# STATUS: PREPARED, NOT YET RUN. No GPU was lent to the session that wrote it (2026-12-02), so
# nothing here has ever executed on CUDA; no test depends on it. Run it on a CUDA machine:
#
#     bash bench/cuda_demo.sh            # writes bench/cuda_demo.out/ (log, summary, img/s)
#
# then paste the "RESULT" block it prints into bench/RESULTS.md (section "CUDA demo").
#
# Needs: `make setup` done with a CUDA build of torch in .venv (the CPU wheel of this repo's
# Makefile has no CUDA: install e.g. `pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128` into .venv first), one NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/cuda_demo.out
WORK=runs/cuda_demo
mkdir -p "$OUT"

"$PY" - <<'EOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("bench/cuda_demo.sh: torch.cuda.is_available() is False (CPU build of torch, or no GPU)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"nccl {'.'.join(map(str, torch.cuda.nccl.version()))}")
EOF

# a short demo: 3 float epochs, 1 QAT epoch, the rest of the chain as in recipes/demo.toml
SETS=(
  --set task.device='"cuda"' --set "task.work_dir=\"$WORK\""
  --set stages.float.epochs=3 --set stages.float.amp=true --set stages.float.channels_last=true
  --set stages.float.sync_bn=true
  --set stages.qat.epochs=1 --set stages.qat.amp=true --set stages.qat.channels_last=true
  --set stages.qat.sync_bn=true
  --set data.train.num_workers=4
)
rm -rf "$WORK"
t0=$(date +%s)
# torchrun with one process: init() joins "cpu:gloo,cuda:nccl", DDP + SyncBatchNorm are used
"$PY" -m torch.distributed.run --standalone --nproc-per-node=1 \
  -m hatcore run recipes/demo.toml "${SETS[@]}" 2>&1 | tee "$OUT/run.log"
t1=$(date +%s)

"$PY" - "$WORK" "$OUT" "$((t1 - t0))" <<'EOF'
import json, sys
from pathlib import Path
work, out, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
rows = []
for stage in ("float", "qat"):
    log = work / stage / "log.jsonl"
    epochs = [json.loads(x) for x in log.read_text().splitlines() if '"kind": "epoch"' in x]
    rows.append(f"{stage}: img/s per epoch " + ", ".join(f"{e['img_s']:.1f}" for e in epochs))
summary = (work / "summary.md").read_text()
text = "\n".join(["RESULT (bench/cuda_demo.sh)", f"wall time {wall} s", *rows, "", summary])
(out / "result.md").write_text(text)
print("\n" + text)
EOF
# what to check in the log: "SyncBatchNorm" conversion (no "sync_bn needs CUDA" line), the GradScaler
# not skipping every step (losses finite), and the table's rows all present.
grep -q "sync_bn needs CUDA" "$OUT/run.log" && echo "WARNING: SyncBatchNorm was not used" || true
