"""`hat run` float-stage speed and CPU split under environment variants, interleaved A/B.

    .venv/bin/python bench/run_speed.py recipes/demo.toml --iters 12 --rounds 2 \\
        --variant default: --variant passive:OMP_WAIT_POLICY=PASSIVE --variant 1thr:OMP_NUM_THREADS=1

A variant can also change the recipe: ``--vset NAME:KEY=VALUE`` adds a ``--set`` for that
variant only (``--set`` applies to all).

Each variant is a fresh `hat run RECIPE --stage float` (one epoch of ``--iters`` iterations, a
throw-away work dir) in its own process with the variant's environment; rounds alternate the
variants so the machine's load hits them alike. Inside the child the trainer's epoch is timed:
img/s over the iterations after the first ``--skip`` (from log.jsonl's per-iteration stamps), and
the epoch's user/sys CPU seconds, the loader workers' included (they are joined, hence reaped,
before the epoch returns), voluntary/involuntary context switches and minor faults of the main
process, and the trainer's own loader figures of the epoch (data_wait, loader_img_s,
loader_ratio: docs/trainer.md, "Is the loader fast enough?"), and the peak resident size. The
load average is printed with each row.

With ``--bare`` each round also runs the bare loop (issue 18's "`hat run` ÷ bare-loop bench"):
the recipe's own model and optimizer settings (SGD with its lr, momentum, Nesterov and weight
decay on every parameter; channels-last as the trainer), trained ``--iters`` steps on **one**
batch taken once from the recipe's real train loader (JPEGs through its transforms): forward,
loss, backward, step and nothing else (no loader, schedule, log, checkpoint). Its img/s is timed
over the same steps; the process applies the same startup settings as ``hat``
(hatcore.runtime). The ratio printed is hat run ÷ bare, per round.

    --child ...   (internal) run `hat` in this process with the epoch instrumented
    --bare-child  (internal) the bare loop
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

FEED = ("data_wait", "loader_img_s", "loader_ratio")  # the trainer's loader figures of an epoch


def _usage() -> tuple[float, float, int, int, int]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime, s.ru_nvcsw, s.ru_nivcsw, s.ru_minflt)


def _spent(a: tuple[float, ...], b: tuple[float, ...]) -> dict[str, float]:
    """What the process used between two :func:`_usage` readings."""
    return dict(zip(("user", "sys", "vcsw", "ivcsw", "minflt"),
                    (y - x for x, y in zip(a, b, strict=True)), strict=True))


def child(out: str, argv: list[str]) -> None:
    from hatcore import cli, trainer

    original = trainer.Trainer._epoch
    records: list[dict[str, float]] = []

    def timed(self):  # type: ignore[no-untyped-def]
        a = _usage()
        metrics = original(self)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        records.append({**_spent(a, _usage()), "peak_mib": peak})
        return metrics

    trainer.Trainer._epoch = timed  # type: ignore[method-assign]
    try:
        cli.main(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        Path(out).write_text(json.dumps(records))


def bare_child(out: str, recipe: str, iters: int, skip: int, sets: list[str]) -> None:
    from hatcore import runtime

    runtime.apply_process_settings()  # as the `hat` command does before torch loads
    import torch
    from fcos_train_speed import bare_train_loop

    from hatcore.pipeline import Pipeline

    pipe = Pipeline.load(recipe, sets)
    torch.manual_seed(0)
    batch = next(iter(pipe.loader("train")))
    cfg = pipe.recipe.stages.float
    opt = cfg.optimizer
    if opt.type != "sgd":
        raise SystemExit(f"--bare: the bare loop is SGD; the recipe's float optimizer is {opt.type}")
    a = _usage()
    times = bare_train_loop(pipe.build_model(), batch, iters - 1 - skip, warmup=skip + 1,
                            channels_last=cfg.channels_last, lr=opt.lr, momentum=opt.momentum,
                            nesterov=opt.nesterov, weight_decay=opt.weight_decay)
    spent = _spent(a, _usage())
    Path(out).write_text(json.dumps({"img_s": len(batch["img"]) * len(times) / sum(times), **spent}))


def bare(recipe: str, env: dict[str, str], iters: int, skip: int, sets: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bare.json"
        subprocess.run([sys.executable, __file__, "--bare-child", str(out), recipe, str(iters),
                        str(skip), *sets], check=True, env={**os.environ, **env},
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


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
        batch = next(x["global_batch"] for x in lines if x.get("kind") == "lr")
        stamps = [x["time"] for x in its]
        rate = batch * (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
        epoch = next(x for x in lines if x.get("kind") == "epoch")
        feed = {k: epoch[k] for k in FEED if k in epoch}
        return {"img_s": rate, **usage, **feed}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--bare-child":
        out, recipe, iters, skip, *sets = sys.argv[2:]
        bare_child(out, recipe, int(iters), int(skip), sets)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="iterations not timed (warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:K=V,K=V (environment of that variant); default: one 'default:'")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--vset", action="append", default=[],
                    help="NAME:KEY=VALUE, a recipe --set for variant NAME only (e.g. "
                         "'frozen:stages.float.frozen=[\"backbone.stem\"]')")
    ap.add_argument("--bare", action="store_true",
                    help="also run the bare loop each round (first variant's environment)")
    args = ap.parse_args()
    variants = []
    for v in args.variant or ["default:"]:
        name, _, kv = v.partition(":")
        variants.append((name, dict(p.split("=", 1) for p in kv.split(",") if p)))
    own: dict[str, list[str]] = {}
    for v in args.vset:
        name, _, kv = v.partition(":")
        own.setdefault(name, []).append(kv)
    runs = [(name, env, one) for name, env in variants]
    if args.bare:
        runs.append(("bare", variants[0][1], bare))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in runs}
    for r in range(args.rounds):
        for name, env, run in runs:
            res = run(args.recipe, env, args.iters, args.skip, args.sets + own.get(name, []))
            rows[name].append(res)
            print(f"round {r + 1} {name:12s} {res['img_s']:6.2f} img/s  user {res['user']:7.1f} s  "
                  f"sys {res['sys']:6.1f} s  sys/user {res['sys'] / max(res['user'], 1e-9):.2f}  "
                  f"vcsw {res['vcsw']:.0f} ivcsw {res['ivcsw']:.0f} minflt {res['minflt']:.0f}  "
                  + "".join(f"{k} {res[k]:.2f}  " for k in (*FEED, "peak_mib") if k in res)
                  + f"load {os.getloadavg()[0]:.2f}", flush=True)
    print("median img/s:", "  ".join(f"{n} {statistics.median(x['img_s'] for x in rows[n]):.2f}"
                                     for n in rows))
    if args.bare:
        first = variants[0][0]
        print(f"{first} ÷ bare per round:", ", ".join(
            f"{a['img_s'] / b['img_s']:.2f}" for a, b in zip(rows[first], rows["bare"], strict=True)))


if __name__ == "__main__":
    main()
