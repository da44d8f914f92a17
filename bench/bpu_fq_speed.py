"""Fake-quant eval speed ÷ float eval, FCOS: plain paths vs the no-grad fast paths, one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_fq_speed.py --size 512 --batch 8
    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_fq_speed.py --recipe recipes/demo.toml --size 192

Builds the recipe's ``[model]`` (random weights unless ``--pretrained``), quantizes it with the
recipe's ``[quantize]`` and ``[target]`` twice (``exact_eval`` false and true), calibrates on
one random batch and times the eval forward (``torch.no_grad()``) of: the float model, fake
quant on its plain paths (:func:`hat_bpu.quant.intmath.plain_paths`, the code before the fast
paths) and on its fast paths, for both settings. The five are interleaved ``--rounds`` times (so
that load from other processes hits all alike) and the median of each is reported, with its
ratio to the float forward; the fast outputs are checked equal to the plain ones bit for bit.
The ``hat`` command's process settings (:mod:`hatcore.runtime`) are applied first, as in ``hat
run`` / ``hat predict`` (``HAT_PROCESS_SETTINGS=0``: without them). ``--compile`` adds the fast
paths with the ``torch.compile``-fused conv epilogue
(:func:`hat_bpu.quant.intmath.compile_epilogue`; compiled before timing; the built epilogue off).
"fast" uses the built epilogue (:mod:`hat_bpu.native`) where it is built, "fast_1thread" the
same with its passes on one thread; "torch_epilogue" is the fast paths with it switched off.
``--threads 0`` keeps torch's default thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

from hatcore.runtime import apply_process_settings

SETTINGS = apply_process_settings()  # as `hat` applies them, before torch loads

import attrs  # noqa: E402
import torch  # noqa: E402
from hat_bpu import native  # noqa: E402
from hat_bpu.quant import intmath  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from hatcore import quant  # noqa: E402
from hatcore.plugins import get_plugins  # noqa: E402
from hatcore.recipe import load_recipe  # noqa: E402


def leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def quantized(plugins: Any, recipe: Any, model: nn.Module, x: torch.Tensor, exact: bool
              ) -> nn.Module:
    spec = attrs.evolve(recipe.quantize, exact_eval=exact)
    q = plugins.hook.quantize(model=copy.deepcopy(model), spec=spec, stage="calibration",
                              target=recipe.target)
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(x)
    quant.set_mode(q, "fake_quant")
    return q.eval()


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/fcos_efficientnetb0_mscoco.toml")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--pretrained", action="store_true",
                    help="load the recipe's pretrained backbone weights (default: random)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time the compiled epilogue")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # random heads: bias saturation warnings
    plugins = get_plugins()
    overrides = [] if args.pretrained else ['model.backbone.pretrained=""']
    recipe, _ = load_recipe(args.recipe, plugins.registry, overrides)
    torch.manual_seed(0)
    model = plugins.hook.build_model(spec=recipe.model, plugins=plugins).eval()
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fq, exact = (quantized(plugins, recipe, model, x, e) for e in (False, True))

    def run(m: nn.Module, plain: bool, compiled: bool = False, built: bool = True,
            threads: int | None = None) -> Callable[[], Any]:
        def go() -> Any:
            intmath.compile_epilogue(compiled)
            with intmath.plain_paths(plain), torch.no_grad(), native.disabled(not built), \
                    native.threads(threads):
                return m(x)
        return go

    cases = {"float": run(model, False), "fq_plain": run(fq, True), "fq_fast": run(fq, False),
             "exact_plain": run(exact, True), "exact_fast": run(exact, False)}
    if native.available():  # the fast paths with the torch-pass epilogue, for comparison
        cases.update(fq_torch_epilogue=run(fq, False, built=False),
                     exact_torch_epilogue=run(exact, False, built=False),
                     fq_fast_1thread=run(fq, False, threads=1),  # the built passes on one thread
                     exact_fast_1thread=run(exact, False, threads=1))
    if args.compile:  # the compiled epilogue serves only where the built one does not
        cases.update(fq_compiled=run(fq, False, True, False),
                     exact_compiled=run(exact, False, True, False))
    same = {}
    for name, m in (("fq", fq), ("exact", exact)):
        ref = leaves(run(m, True)())
        for kind in ("fast", "compiled") if args.compile else ("fast",):
            got = leaves(run(m, False, kind == "compiled", kind != "compiled")())
            same[f"{name}_{kind}"] = len(got) == len(ref) > 0 and all(
                torch.equal(u, v) for u, v in zip(got, ref, strict=True))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "recipe": args.recipe, "input": list(x.shape), "channels_last": args.channels_last,
        "threads": torch.get_num_threads(), "built_epilogue": native.available(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "rounds": args.rounds, "pretrained": args.pretrained, "process_settings": SETTINGS,
        "ms": {k: round(1e3 * v, 1) for k, v in med.items()},
        "ratio_to_float": {k: round(v / med["float"], 2) for k, v in med.items() if k != "float"},
        "fast_equals_plain_bit_for_bit": same, "loadavg": os.getloadavg()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
