"""`hat run` float-stage speed and CPU split under environment variants, interleaved A/B.

    .venv/bin/python bench/run_speed.py recipes/demo.toml --iters 12 --rounds 2 \\
        --variant default: --variant passive:OMP_WAIT_POLICY=PASSIVE --variant 1thr:OMP_NUM_THREADS=1

Each variant is a fresh `hat run RECIPE --stage float` (one epoch of ``--iters`` iterations, a
throw-away work dir) in its own process with the variant's environment; rounds alternate the
variants so the machine's load hits them alike. Inside the child the trainer's epoch is timed:
img/s over the iterations after the first ``--skip`` (from log.jsonl's per-iteration stamps), and
the epoch's user/sys CPU seconds, the loader workers' included (they are joined, hence reaped,
before the epoch returns), voluntary/involuntary context switches and minor faults of the main
process. The load average is printed with each row.

    --child ...   (internal) run `hat` in this process with the epoch instrumented
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _usage() -> tuple[float, float, int, int, int]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime, s.ru_nvcsw, s.ru_nivcsw, s.ru_minflt)


def child(out: str, argv: list[str]) -> None:
    from hatcore import cli, trainer

    original = trainer.Trainer._epoch
    records: list[dict[str, float]] = []

    def timed(self):  # type: ignore[no-untyped-def]
        a = _usage()
        metrics = original(self)
        b = _usage()
        records.append(dict(zip(("user", "sys", "vcsw", "ivcsw", "minflt"),
                                (y - x for x, y in zip(a, b, strict=True)), strict=True)))
        return metrics

    trainer.Trainer._epoch = timed  # type: ignore[method-assign]
    try:
        cli.main(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        Path(out).write_text(json.dumps(records))


def one(recipe: str, env: dict[str, str], iters: int, skip: int, sets: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "w"
        out = Path(tmp) / "usage.json"
        argv = ["run", recipe, "--stage", "float", "--set", "stages.float.epochs=1",
                "--set", f"stages.float.max_iters_per_epoch={iters}", "--set", "stages.float.log_interval=1",
                "--set", f'task.work_dir="{work}"']
        for s in sets:
            argv += ["--set", s]
        subprocess.run([sys.executable, __file__, "--child", str(out), *argv], check=True,
                       env={**os.environ, **env}, stdout=subprocess.DEVNULL)
        usage = json.loads(out.read_text())[0]
        lines = [json.loads(x) for x in (work / "float" / "log.jsonl").read_text().splitlines()]
        its = [x for x in lines if x.get("kind") == "iter"]
        batch = 8
        stamps = [x["time"] for x in its]
        rate = batch * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
        return {"img_s": rate, **usage}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="iterations not timed (warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:K=V,K=V (environment of that variant); default: one 'default:'")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    variants = []
    for v in args.variant or ["default:"]:
        name, _, kv = v.partition(":")
        variants.append((name, dict(p.split("=", 1) for p in kv.split(",") if p)))
    rows: dict[str, list[dict[str, float]]] = {n: [] for n, _ in variants}
    for r in range(args.rounds):
        for name, env in variants:
            res = one(args.recipe, env, args.iters, args.skip, args.sets)
            rows[name].append(res)
            print(f"round {r + 1} {name:12s} {res['img_s']:6.2f} img/s  user {res['user']:7.1f} s  "
                  f"sys {res['sys']:6.1f} s  sys/user {res['sys'] / max(res['user'], 1e-9):.2f}  "
                  f"vcsw {res['vcsw']:.0f} ivcsw {res['ivcsw']:.0f} minflt {res['minflt']:.0f}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    print("median img/s:", "  ".join(f"{n} {statistics.median(x['img_s'] for x in rows[n]):.2f}"
                                     for n, _ in variants))


if __name__ == "__main__":
    main()
