"""QAT step time / float step time: hat-bpu's quantizer vs torch.ao FX QAT, same model and batch.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bpu_quant.py --model convnet6 --size 128 --batch 8

A step is forward + MSE loss + backward + SGD update. The median of ``--iters`` steps after
``--warmup`` is reported. ``--model fcos`` builds the FCOS-EfficientNet-B0 through the
installed plugins' ``build_model`` hook (when hat-fcos is installed) and times its backbone+neck+head.

``--recipe recipes/demo.toml`` builds the recipe's ``[model]`` instead (random weights:
``pretrained`` is dropped) and ``--interleave`` times float, HAT QAT with the training fast
paths and HAT QAT on the plain paths (``intmath.plain_paths``) one step each in turn, so the
ratios come from the same minutes of a shared machine (the demo's QAT setting, as ``hat run``):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bpu_quant.py --recipe recipes/demo.toml \
        --size 192 --batch 8 --threads 2 --channels-last --lr 0 --interleave

(``--lr 0``: the random-weight model diverges under this loss; the step's arithmetic is the same.)
The ``hat`` command's process settings (:mod:`hatcore.runtime`: the OpenMP wait for a free or busy
machine unless set, glibc malloc thresholds) are applied first, as in ``hat run``
(``HAT_PROCESS_SETTINGS=0``: without them).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hatcore.runtime import apply_process_settings

SETTINGS = apply_process_settings()  # as `hat` applies them, before torch loads

import torch  # noqa: E402
from hat_bpu.plugin import HorizonQuantizeSpec, quantize  # noqa: E402
from torch import nn  # noqa: E402

from hatcore import quant  # noqa: E402
from hatcore.quant import DeQuantStub, QuantStub  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "plugins" / "hat-bpu" / "tests"))
from example_net import SmallNet  # noqa: E402  (a test helper of hat-bpu)


class ConvNet6(nn.Module):
    """Six conv-BN-ReLU layers (strides 2,1,2,1,2,1), 32..128 channels, between quant stubs."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 32, 32, 64, 64, 128, 128]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 2 - i % 2, 1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        self.quant, self.body, self.dequant = QuantStub(1 / 128), nn.Sequential(*layers), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.body(self.quant(x)))


class MBConv(nn.Module):
    """EfficientNet-Lite inverted residual: 1×1 expand, k×k depthwise, 1×1 project (ReLU6, no SE)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, k: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                   nn.BatchNorm2d(mid), nn.ReLU6(),
                   nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x if self.residual else self.body(x)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features (stem, 16 MBConv blocks, 1×1 head to 1280), random weights."""

    def __init__(self) -> None:
        super().__init__()
        cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
               (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
        blocks: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                   nn.ReLU6()]
        cin = 32
        for t, c, n, s, k in cfg:
            for i in range(n):
                blocks.append(MBConv(cin, c, t, s if i == 0 else 1, k))
                cin = c
        blocks += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.quant, self.features, self.dequant = QuantStub(1 / 128), nn.Sequential(*blocks), \
            DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.features(self.quant(x)))


def build(name: str) -> nn.Module:
    if name == "efficientnet_lite0":
        return EfficientNetLite0()
    if name == "convnet6":
        return ConvNet6()
    if name == "smallnet":
        return SmallNet(width=32)
    if name == "fcos":
        from hatcore.plugins import get_plugins
        from hatcore.recipe import (
            ModelSpec,
            make_converter,  # type: ignore[attr-defined]
        )

        plugins = get_plugins()
        spec = make_converter(plugins.registry).structure({"type": "fcos", "num_classes": 80},
                                                          ModelSpec)
        return plugins.hook.build_model(spec=spec, plugins=plugins)
    raise SystemExit(f"unknown model {name!r}")


def build_from_recipe(path: str) -> nn.Module:
    """The ``[model]`` of a recipe file through the installed plugins (``pretrained`` dropped)."""
    import tomllib

    from hatcore.plugins import get_plugins
    from hatcore.recipe import (
        ModelSpec,
        make_converter,  # type: ignore[attr-defined]
    )

    with open(path, "rb") as f:
        table = dict(tomllib.load(f)["model"])
    if isinstance(table.get("backbone"), dict):
        table["backbone"] = {k: v for k, v in table["backbone"].items() if k != "pretrained"}
    plugins = get_plugins()
    spec = make_converter(plugins.registry).structure(table, ModelSpec)
    return plugins.hook.build_model(spec=spec, plugins=plugins)


def loss_of(out: Any) -> torch.Tensor:
    leaves = torch.utils._pytree.tree_leaves(out)
    return sum(t.float().square().mean() for t in leaves if isinstance(t, torch.Tensor))


def interleaved(models: dict[str, tuple[nn.Module, bool, bool]], x: torch.Tensor, iters: int,
                warmup: int, lr: float, one_thread: set[str] | None = None
                ) -> dict[str, list[float]]:
    """One step of each model in turn (``(model, plain paths, built passes on)``; those named
    in ``one_thread`` with the built passes on one thread), ``warmup + iters`` rounds; the step
    times (s) of the last ``iters`` rounds, per model."""
    from hat_bpu import native
    from hat_bpu.quant import intmath

    opts = {k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
            for k, (m, _, _) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m, _, _ in models.values():
        m.train()
    for i in range(warmup + iters):
        for k, (m, plain, built) in models.items():
            with intmath.plain_paths(plain), native.disabled(not built), \
                    native.threads(1 if k in (one_thread or set()) else None):
                t0 = time.perf_counter()
                loss = loss_of(m(x))
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
                t = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(t)
    return times


def time_steps(model: nn.Module, x: torch.Tensor, iters: int, warmup: int,
               lr: float = 1e-4) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        loss = loss_of(model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrated_hat(model: nn.Module, x: torch.Tensor, frozen_bn: bool = False) -> nn.Module:
    spec = HorizonQuantizeSpec(type="horizon", observer="minmax",
                               freeze_bn_epoch=0 if frozen_bn else None)
    q = quantize(model=copy.deepcopy(model).eval(), spec=spec, stage="qat", target=None)
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(x)
    quant.set_mode(q, "qat")
    return q


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    try:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(copy.deepcopy(model).train(),
                              get_default_qat_qconfig_mapping("x86"), (x,))
    except Exception as exc:  # not traceable by torch.ao
        print(f"torch.ao FX QAT failed: {type(exc).__name__}: {exc}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnet6",
                    choices=["convnet6", "smallnet", "efficientnet_lite0", "fcos"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frozen-bn", action="store_true",
                    help="HAT QAT with BN folded from the start (freeze_bn_epoch = 0): the "
                         "integer requantization path; default: live BN (float fake quant)")
    ap.add_argument("--recipe", help="time this recipe's [model] (random weights) instead")
    ap.add_argument("--channels-last", action="store_true",
                    help="models and input channels-last, as hat's trainer does by default")
    ap.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of the steps")
    ap.add_argument("--interleave", action="store_true",
                    help="float, QAT (fast paths), QAT (plain paths), QAT (fast paths, built "
                         "passes off) and QAT (built passes on one thread) one step each in turn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_from_recipe(args.recipe) if args.recipe else build(args.model)
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    result: dict[str, Any] = {"model": args.recipe or args.model, "input": list(x.shape),
                              "threads": args.threads, "channels_last": args.channels_last,
                              "lr": args.lr, "process_settings": SETTINGS}
    if args.interleave:
        q = calibrated_hat(model, x, args.frozen_bn)
        models = {"float": model, "qat_fast": q, "qat_plain": copy.deepcopy(q),
                  "qat_fast_unbuilt": copy.deepcopy(q),  # fast paths without hat_bpu._native
                  "qat_fast_1thread": copy.deepcopy(q)}  # its passes on one thread
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            models = {k: m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
                      for k, m in models.items()}
        times = interleaved({k: (m, k == "qat_plain", k != "qat_fast_unbuilt")
                             for k, m in models.items()}, x, args.iters, args.warmup, args.lr,
                            one_thread={"qat_fast_1thread"})
        med = {k: statistics.median(v) for k, v in times.items()}
        result.update(frozen_bn=args.frozen_bn, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                      fast_ratio=med["qat_fast"] / med["float"],
                      plain_ratio=med["qat_plain"] / med["float"],
                      fast_over_plain=med["qat_fast"] / med["qat_plain"],
                      unbuilt_ratio=med["qat_fast_unbuilt"] / med["float"],
                      one_thread_ratio=med["qat_fast_1thread"] / med["float"])
        print(json.dumps(result, indent=1))
        return
    t_float = time_steps(model, x, args.iters, args.warmup)
    t_hat = time_steps(calibrated_hat(model, x, args.frozen_bn), x, args.iters, args.warmup)
    result["frozen_bn"] = args.frozen_bn
    result.update(float_ms=1e3 * t_float, hat_qat_ms=1e3 * t_hat, hat_ratio=t_hat / t_float)
    ao = torch_ao_qat(model, x)
    if ao is not None:
        t_ao = time_steps(ao, x, args.iters, args.warmup)
        result.update(torch_ao_qat_ms=1e3 * t_ao, torch_ao_ratio=t_ao / t_float)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
