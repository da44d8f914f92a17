"""The training loop shared by the float and QAT stages, and calibration.

One epoch: for each batch, ``raw = model(img)``, ``losses = compute_loss(raw, batch)``, the sum
is back-propagated; LR follows the schedule every iteration; the EMA follows the weights.
After each epoch: validation when due, ``checkpoint-best.pt`` when the validation metric
improved, a ``log.jsonl`` line, the ``on_epoch_end`` hook and then ``checkpoint-last.pt``
(everything resume needs, including what the hook changed: a quantizer freezes BN statistics and
observers there, so a resumed QAT run starts from the frozen state). With
``checkpoint_every_iters = N`` a ``checkpoint-last.pt`` is also written every N iterations inside
an epoch. Each epoch is seeded from ``(seed, epoch)``; a run resumed at an epoch boundary
replays exactly what an uninterrupted one would have done, and so does one resumed mid-epoch: it
re-reads (without training on them) the batches the epoch had already used, so the data order
and the loader workers' random state are those of the uninterrupted run, then restores the
RNG states saved with the checkpoint.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hatcore import distributed as dist
from hatcore.callbacks import progress
from hatcore.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from hatcore.data import LOAD_SECONDS, to_device
from hatcore.errors import UserError
from hatcore.optim import LRSchedule, ModelEMA, build_optimizer, build_scheduler, scaled_lr
from hatcore.protocols import task_model
from hatcore.recipe import TrainStage
from hatcore.workdir import CHECKPOINT_BEST, CHECKPOINT_LAST, LOG, METRICS, write_metrics

__all__ = ["Trainer", "build_optimizer", "build_scheduler", "calibrate", "check_finite_loss",
           "configure_determinism", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def configure_determinism(deterministic: bool) -> None:
    """Apply ``task.deterministic``.

    On: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
    deterministic implementation warns, naming itself, instead of stopping the run), cuDNN in
    deterministic mode without autotuning, and the fixed cuBLAS workspace CUDA asks for (new
    tensors are not NaN-filled: ``torch.utils.deterministic.fill_uninitialized_memory`` off,
    either way). Off: the
    library defaults plus cuDNN autotuning (fastest, not reproducible). Seeding (``task.seed``)
    happens either way: every epoch from ``(seed, epoch)``, calibration from ``seed``, loader
    workers from the loader's generator.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Deterministic mode also NaN-fills every new tensor by default (a debugging aid for code
    # that reads memory it never wrote; kernels write their outputs whole): a full extra write
    # of every activation, 18 % of an FCOS eval forward here (bench/RESULTS.md). Off.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, CUDA, numpy and ``random`` as tensors and plain lists.

    Plain types only, so the state survives ``torch.load(weights_only=True)``.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "random": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss_next"]))


def freeze_bn(model: nn.Module, patterns: list[str]) -> int:
    """Put the BatchNorm layers under modules matching ``patterns`` (fnmatch globs on module
    names, e.g. ``"backbone*"``) in eval mode: running statistics are used and kept, the affine
    parameters still train. Returns how many layers were frozen."""
    if not patterns:
        return 0
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                fnmatch.fnmatchcase(name, p) for p in patterns):
            module.eval()
            count += 1
    return count


def freeze_params(model: nn.Module, patterns: list[str], stage: str) -> int:
    """Stop the parameters of the modules matching ``patterns`` (fnmatch globs on module names)
    from training: ``requires_grad = False``, so they get no gradient and stay out of the
    optimizer. A pattern that matches no module is a :class:`UserError` (a typo would otherwise
    train everything, silently). Returns how many parameters were frozen."""
    frozen: set[int] = set()
    for pattern in patterns:
        modules = [m for name, m in model.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
        if not modules:
            top = ", ".join(name for name, _ in model.named_children())
            raise UserError(f"stages.{stage}.frozen: {pattern!r} matches no module of the model "
                            f"(module names are dotted paths such as 'backbone.stem'; top level: {top})")
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
                frozen.add(id(p))
    return len(frozen)


class DivergenceError(UserError):
    """Training produced a non-finite loss; the stage stopped (checkpoint-last.pt untouched)."""


def check_finite_loss(stage: str, losses: dict[str, torch.Tensor], step: int, epoch: int,
                      lr: float, lr_note: str) -> None:
    """The divergence guard: raise :class:`DivergenceError` when a loss is NaN or infinite.

    Called before the backward pass, so no weight, optimizer state or checkpoint ever sees the
    bad step: ``checkpoint-last.pt`` stays the last good one and a rerun resumes from it.
    With several processes, all of them stop at the same step.
    """
    total = torch.stack([v.detach().float().sum() for v in losses.values()]).sum()
    bad = (~torch.isfinite(total)).float().reshape(1)
    if dist.world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if not bool(bad.item()):
        return
    parts = ", ".join(f"{k} = {float(v.detach()):g}" for k, v in losses.items())
    raise DivergenceError(
        f"{stage}: the loss is not finite at step {step} (epoch {epoch + 1}): {parts}. Training "
        f"stopped; checkpoint-last.pt holds the last good epoch. Likely cause: an lr too high "
        f"for this batch ({lr_note}; lr at this step {lr:.4g}): lower optimizer.lr, set "
        f"optimizer.base_batch_size to the batch the lr was tuned for, or lengthen the warmup.")


def loss_rise_warning(stage: str, history: list[dict[str, Any]], factor: float,
                      lr_note: str) -> str | None:
    """A warning when the last epoch's mean loss exceeds ``factor`` x the first epoch's."""
    if factor <= 0 or len(history) < 2 or "loss" not in history[0] or "loss" not in history[-1]:
        return None
    first, last = float(history[0]["loss"]), float(history[-1]["loss"])
    if not last > factor * first:
        return None
    return (f"{stage}: warning: epoch {len(history)} loss {last:.4g} is {last / first:.1f}x the "
            f"first epoch's ({first:.4g}; loss_rise_factor = {factor:g}): training is likely "
            f"diverging. Likely cause: an lr too high for this batch ({lr_note}).")


def load_weights(model: nn.Module, path: str, strict: bool, where: str) -> list[str]:
    """Load ``path`` (a checkpoint with ``model``/``ema`` or a bare state_dict) into ``model``.

    :returns: the keys skipped (only when not ``strict``), each with why.
    :raises UserError: the file is missing or unreadable, or (``strict``) keys are missing,
        unexpected or of another shape — named one by one.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{where}.load_from: {path}: no such checkpoint")
    state = load_checkpoint(file, map_location="cpu")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{where}.load_from: {path}: not a checkpoint or state_dict")
    own = model.state_dict()
    shape = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [f"{k}: not in the checkpoint" for k in own if k not in state]
    extra = [f"{k}: not in the model" for k in state if k not in own]
    problems = shape + missing + extra
    if problems and strict:
        lines = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more"
                                               if len(problems) > 20 else "")
        raise UserError(f"{where}.load_from: {path} does not fit the model "
                        f"({len(shape)} shape mismatches, {len(missing)} missing, "
                        f"{len(extra)} unexpected keys):\n  {lines}\n"
                        f"Set {where}.load_strict = false to load the matching keys and skip "
                        "these (e.g. a classifier for another num_classes).")
    keep = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(keep, strict=False)
    return problems


def _to_memory_format(batch: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    if channels_last and batch["img"].ndim == 4:
        batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    return batch


class Trainer:
    """Trains ``model`` for ``cfg.epochs`` epochs into ``out_dir``; see the module docstring.

    :param stage: ``"float"`` or ``"qat"`` (names in logs and checkpoints).
    :param model: a task model (``hatcore.data``): ``forward(img)`` and ``compute_loss(raw, batch)``.
    :param evaluate: ``evaluate(model) -> {"AP": ...}``, on the EMA weights when EMA is on.
    :param hook: the plugin manager's hook relay (``on_epoch_end``).
    :param before_epoch: called as ``before_epoch(trainer, epoch)`` before each epoch.
    """

    def __init__(
        self, *, stage: str, model: nn.Module, cfg: TrainStage, train_loader: DataLoader[Any],
        out_dir: Path, device: torch.device, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        best_key: str = "AP", hook: Any = None, seed: int = 0,
        before_epoch: Callable[[Trainer, int], None] | None = None,
    ) -> None:
        self.stage, self.cfg, self.loader = stage, cfg, train_loader
        self.out_dir, self.device, self.evaluate = Path(out_dir), device, evaluate
        self.best_key, self.hook, self.seed, self.before_epoch = best_key, hook, seed, before_epoch
        self.should_stop = False
        self.epoch = 0
        self.step = 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0  # seconds of training, over all runs of this stage
        self._mid_epoch: tuple[dict[str, Any], dict[str, Any]] | None = None  # (position, rng)
        self._warned_feed = False  # the loader-bound warning was given

        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.raw_model = model
        self.frozen_params = freeze_params(model, cfg.frozen, stage)  # before DDP and optimizer
        self.model = dist.wrap(model, device, cfg.sync_bn)
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.iters_per_epoch = len(train_loader)
        if cfg.max_iters_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, cfg.max_iters_per_epoch)
        if cfg.checkpoint_every_iters < 0:
            raise UserError(f"stages.{stage}.checkpoint_every_iters = {cfg.checkpoint_every_iters}: "
                            "expected 0 (off) or a positive number of iterations")
        if self.iters_per_epoch == 0:
            raise UserError(f"{stage}: the training set gives no batch (fewer images than "
                            "data.train.batch_size with drop_last?)")
        self.schedule: LRSchedule = build_scheduler(cfg.schedule, self.iters_per_epoch, cfg.epochs)
        self.global_batch = _batch_size(train_loader) * dist.world_size()
        self.base_lr, self.lr_note = scaled_lr(cfg.optimizer, self.global_batch)
        self.ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    # ------------------------------------------------------------------ state

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved as best: the EMA when on."""
        return self.ema.module if self.ema else self.raw_model

    def _state(self, mid_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything resume needs. ``epoch`` is the last finished epoch; ``mid_epoch`` (or
        None at an epoch's end) says how far the next one got: ``iter`` batches trained, the
        running loss ``sums``, ``images`` and ``seconds`` so far."""
        return {
            "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "scheduler": {"step": self.step}, "stage": self.stage,
            "epoch": self.epoch if mid_epoch is None else self.epoch - 1, "mid_epoch": mid_epoch,
            "step": self.step, "best": self.best, "history": json.dumps(self.history),
            "elapsed": self.elapsed, "rng": rng_state(), "stopped": self.should_stop,
        }

    def _save_last(self, mid_epoch: dict[str, Any] | None = None) -> None:
        """Write ``checkpoint-last.pt`` (rank 0). Called on every process: mid-epoch, each
        process's running loss sums and RNG states are gathered into ``mid_epoch["ranks"]`` (in
        rank order), so that every process resumes its own share of the epoch exactly."""
        if mid_epoch is not None:
            ranks = dist.all_gather_object({"sums": mid_epoch["sums"], "rng": rng_state()})
            mid_epoch = {**mid_epoch, "world_size": len(ranks), "ranks": ranks}
        if dist.is_main():
            save_checkpoint(self.out_dir / CHECKPOINT_LAST, self._state(mid_epoch))

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT_LAST
        if not path.is_file():
            return
        state = load_checkpoint(path, map_location=self.device)
        load_model_state(self.raw_model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best = state["epoch"] + 1, state["step"], state.get("best")
        self.history = json.loads(state.get("history") or "[]")
        self.elapsed = float(state.get("elapsed", 0.0))
        self.should_stop = bool(state.get("stopped", False))
        if state.get("rng"):
            set_rng_state(state["rng"])
        if state.get("mid_epoch"):  # replayed by _epoch: skip what was trained, then these RNGs
            self._mid_epoch = self._own_share(state["mid_epoch"], state["rng"], path)
        if not dist.is_main():
            return
        if self._mid_epoch:
            tqdm.write(f"resuming {self.stage} in epoch {self.epoch + 1}/{self.cfg.epochs} after "
                       f"iteration {self._mid_epoch[0]['iter']}/{self.iters_per_epoch} ({path})")
        elif self.should_stop:
            tqdm.write(f"{self.stage}: stopped early after epoch {self.epoch}/{self.cfg.epochs} "
                       f"({path})")
        elif self.epoch >= self.cfg.epochs:
            tqdm.write(f"{self.stage}: all {self.cfg.epochs} epochs already trained ({path})")
        else:
            tqdm.write(f"resuming {self.stage} from epoch {self.epoch + 1}/{self.cfg.epochs} "
                       f"({path})")

    def _own_share(self, position: dict[str, Any], rng: dict[str, Any], path: Path
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
        """This process's mid-epoch position and RNG states from a checkpoint's ``mid_epoch``.

        Each rank takes its own entry of ``ranks`` (a checkpoint from before per-rank state: the
        one ``sums``/``rng`` of rank 0). Written by another number of processes, the epoch
        goes on after the same iteration on the new split of the data (said: not exact).
        """
        ranks = position.get("ranks") or [{"sums": position.get("sums", {}), "rng": rng}]
        saved = len(ranks)
        if saved == dist.world_size():
            mine = ranks[dist.rank()]
            return {**position, "sums": mine["sums"]}, mine["rng"]
        if dist.is_main():
            tqdm.write(f"{self.stage}: warning: {path} was written mid-epoch by {saved} "
                       f"process(es), this run has {dist.world_size()}: epoch {self.epoch + 1} "
                       f"continues after iteration {position['iter']} on this run's split of the "
                       "data, not the exact data order of an uninterrupted run")
        sums: dict[str, float] = {}
        for r in ranks:  # the mean over the saved processes stands for each new one
            for k, v in r["sums"].items():
                sums[k] = sums.get(k, 0.0) + v / saved
        return {**position, "sums": sums}, ranks[dist.rank() % saved]["rng"]

    def _log(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            with open(self.out_dir / LOG, "a") as f:
                f.write(json.dumps({"stage": self.stage, "time": round(time.time(), 3), **record}) + "\n")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train (resuming if ``checkpoint-last.pt`` exists); return the final metrics."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fresh = not (self.out_dir / "checkpoint-last.pt").is_file()
        if fresh and self.cfg.load_from:
            self._load_from()
        self._resume()
        if dist.is_main() and self.epoch < self.cfg.epochs and not self.should_stop:
            warm = self.schedule.warmup
            tqdm.write(f"{self.stage}: {self.lr_note}; warmup {warm} iterations")
            self._log({"kind": "lr", "lr": self.base_lr, "global_batch": self.global_batch,
                       "warmup_iters": warm, "why": self.lr_note})
            if self.frozen_params:
                tqdm.write(f"{self.stage}: {self.frozen_params} parameter tensors frozen "
                           f"({', '.join(self.cfg.frozen)})")
                self._log({"kind": "frozen", "patterns": self.cfg.frozen,
                           "parameters": self.frozen_params})
        metrics: dict[str, Any] = self.history[-1] if self.history else {}
        while self.epoch < self.cfg.epochs and not self.should_stop:
            metrics = self._epoch()
            self.epoch += 1
        if self.evaluate is None or not (self.out_dir / CHECKPOINT_BEST).is_file():
            self._save_best(metrics)  # nothing scored: the best weights are the last ones
        train = {"epochs": self.epoch, "best": self._best_record(), "last": metrics,
                 "time": round(self.elapsed, 3)}
        if dist.is_main():  # the one metrics.json schema (hatcore.workdir, docs/formats.md)
            write_metrics(self.out_dir / METRICS, self.stage, train=train)
        return metrics

    def _load_from(self) -> None:
        where = f"stages.{self.stage}"
        skipped = load_weights(self.raw_model, self.cfg.load_from, self.cfg.load_strict, where)
        if self.ema:
            self.ema.module.load_state_dict(self.raw_model.state_dict())
        if dist.is_main():
            note = f"; skipped (load_strict = false): {', '.join(skipped)}" if skipped else ""
            tqdm.write(f"{self.stage}: weights from {self.cfg.load_from}{note}")
            self._log({"kind": "load_from", "path": self.cfg.load_from, "skipped": skipped})

    def _best_record(self) -> dict[str, Any]:
        scored = [h for h in self.history if self.best_key in h]
        if not scored:
            return self.history[-1] if self.history else {}
        return max(scored, key=lambda h: h[self.best_key])

    def _epoch(self) -> dict[str, Any]:
        epoch, cfg = self.epoch, self.cfg
        # each process its own random stream (augmentations differ between ranks); rank 0's
        # is a single process's, so one process trains as before
        seed = self.seed * 1000 + epoch + _RANK_SEED_STRIDE * dist.rank()
        seed_everything(seed)
        gen = getattr(self.loader, "generator", None)
        if gen is not None:
            gen.manual_seed(seed)
        if getattr(self.loader, "persistent_workers", False):
            # persistent workers keep their RNG running across epochs, so a resumed run would
            # draw other augmentations: new workers each epoch take their seeds from ``gen``
            self.loader._iterator = None  # type: ignore[attr-defined]
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for t in getattr(getattr(self.loader, "dataset", None), "transforms", None) or []:
            if hasattr(t, "set_epoch"):  # e.g. mosaic, off for a stage's last epochs
                t.set_epoch(epoch, cfg.epochs)
        if self.before_epoch:
            self.before_epoch(self, epoch)
        self.model.train()
        freeze_bn(self.raw_model, self.cfg.frozen_bn)
        resume, self._mid_epoch = self._mid_epoch, None
        position = resume[0] if resume else {}
        skip = int(position.get("iter", 0))  # batches this epoch already trained on
        sums: dict[str, float] = dict(position.get("sums", {}))
        images, steps = int(position.get("images", 0)), skip
        t0 = time.perf_counter() - float(position.get("seconds", 0.0))
        bar = progress(total=self.iters_per_epoch, initial=skip,
                       desc=f"{self.stage} {epoch + 1}/{cfg.epochs}", leave=True)
        lr = 0.0
        every = cfg.checkpoint_every_iters
        batches = iter(self.loader)
        feed = _Feed()
        for i, batch in enumerate(batches):
            if i >= self.iters_per_epoch:
                break
            if i < skip:  # resumed mid-epoch: the batches were read to replay the loader's state
                if i + 1 == skip and resume:
                    set_rng_state(resume[1])  # ...and the RNGs continue from the checkpoint
                feed.mark()
                continue
            feed.got(batch, first=i == skip)
            lr = self.schedule.apply(self.optimizer, self.base_lr, self.step)
            self._now = (epoch, lr)  # for the divergence guard's message
            losses = self._train_step(batch)
            n = int(batch["img"].shape[0]) * dist.world_size()
            images += n
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            self.step += 1
            steps += 1
            spent = max(time.perf_counter() - t0, 1e-9)
            rate = images / spent
            left = (cfg.epochs - epoch) * self.iters_per_epoch - steps  # iterations in the stage
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {
                "lr": f"{lr:.2e}", "img/s": f"{rate:.1f}",
                "stage ETA": tqdm.format_interval(left * spent / max(1, steps - skip))},
                refresh=False)
            bar.update(1)
            if self.hook is not None and dist.is_main():
                self.hook.on_iter_end(trainer=self, step=self.step,
                                      metrics={**losses, "lr": lr, "img_s": rate})
            if cfg.log_interval and self.step % cfg.log_interval == 0:
                self._log({"kind": "iter", "epoch": epoch, "iter": i, "step": self.step,
                           **losses, "lr": lr, "img_s": rate})
            if every and self.step % every == 0 and i + 1 < self.iters_per_epoch:
                self._save_last({"iter": i + 1, "sums": dict(sums), "images": images,
                                 "seconds": time.perf_counter() - t0})
            feed.mark()
        if not getattr(self.loader, "persistent_workers", False):
            _shutdown_workers(batches)  # joined now, not at the interpreter's exit
        del batches
        bar.close()
        seconds = time.perf_counter() - t0
        self.elapsed += seconds  # the checkpoint's elapsed excludes this epoch's first part
        per_rank = dist.all_gather_object(sums)  # every rank reports the mean over all of them
        metrics: dict[str, Any] = {k: sum(r[k] for r in per_rank) / (len(per_rank) * max(1, steps))
                                   for k in sums}
        metrics.update(epoch=epoch, lr=lr, img_s=images / max(seconds, 1e-9),
                       epoch_time=round(seconds, 3))
        metrics.update(feed.figures(getattr(self.loader, "num_workers", 0)))
        if not self._warned_feed and dist.is_main() and (warning := feed_warning(
                self.stage, epoch, metrics, getattr(self.loader, "num_workers", 0))):
            self._warned_feed = True  # once per stage run: the loader does not change
            tqdm.write(warning)
            self._log({"kind": "warning", "epoch": epoch, "message": warning})
        last = epoch + 1 == cfg.epochs
        if self.evaluate and (last or (cfg.val_interval and (epoch + 1) % cfg.val_interval == 0)):
            metrics.update(self.evaluate(self.eval_model))
        self.history.append(metrics)
        warning = loss_rise_warning(self.stage, self.history, cfg.loss_rise_factor, self.lr_note)
        if warning and dist.is_main():
            tqdm.write(warning)
            self._log({"kind": "warning", "epoch": epoch, "message": warning})
        if self.best_key in metrics and (self.best is None or metrics[self.best_key] > self.best):
            self.best = float(metrics[self.best_key])
            self._save_best(metrics)
        self._log({"kind": "epoch", **metrics})
        if self.hook is not None:  # before checkpoint-last: it saves what the hooks changed
            self.hook.on_epoch_end(trainer=self, epoch=epoch, metrics=metrics)
        self.should_stop = bool(dist.broadcast_object(self.should_stop))  # rank 0 decides
        self._save_last()
        dist.barrier()
        return metrics

    def _save_best(self, metrics: dict[str, Any]) -> None:
        if dist.is_main():
            save_checkpoint(self.out_dir / CHECKPOINT_BEST, {
                "model": self.eval_model.state_dict(), "stage": self.stage,
                "epoch": int(metrics.get("epoch", self.epoch)),
                "metrics": json.dumps(metrics)})

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        batch = _to_memory_format(to_device(batch, self.device), cfg.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=cfg.amp):
            raw = self.model(batch["img"])
            losses = task_model(dist.unwrap(self.model)).compute_loss(raw, batch)
        epoch, lr = getattr(self, "_now", (self.epoch, self.base_lr))
        check_finite_loss(self.stage, losses, self.step, epoch, lr, self.lr_note)
        total = cast(torch.Tensor, sum(losses.values()))  # sum() is typed Tensor | Literal[0]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema:
            self.ema.update(self.raw_model)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        return out


_RANK_SEED_STRIDE = 1_000_003  # rank r seeds its epochs with seed*1000 + epoch + r*stride


class _Feed:
    """How an epoch's batches arrived: the seconds the steps waited for them and the seconds
    the loader spent making them (``LOAD_SECONDS``, where the dataset is timed)."""

    def __init__(self) -> None:
        self.waited = self.first_wait = self.made = 0.0
        self.timed = self.images = 0  # images whose making was timed; images trained on
        self.steps_from = self.last = time.perf_counter()

    def mark(self) -> None:
        """A step ended: the wait for the next batch starts."""
        self.last = time.perf_counter()

    def got(self, batch: Any, first: bool) -> None:
        """The next batch arrived (``first``: the epoch's first, which also waits for the
        loader's workers to start)."""
        wait = time.perf_counter() - self.last
        if first:
            self.first_wait = wait
            self.steps_from = time.perf_counter()
        else:
            self.waited += wait
        made = batch.pop(LOAD_SECONDS, None) if isinstance(batch, dict) else None
        n = int(batch["img"].shape[0]) if isinstance(batch, dict) and "img" in batch else 0
        if made is not None and n:
            self.made += float(made)
            self.timed += n
        self.images += n

    def figures(self, workers: int) -> dict[str, float]:
        """``data_wait``: the share of the epoch (after its first batch) the steps waited for
        data (``data_wait_s``: the seconds); ``first_batch_s``: the wait for the first (the
        workers' start included);
        ``loader_img_s``: what the loader could make (``workers`` in parallel, each at
        its measured rate; the main process alone without workers); ``train_img_s``: what the
        steps consumed while not waiting; ``loader_ratio``: the first ÷ the second (this
        process's images, in a distributed run each rank's own loader)."""
        span = max(time.perf_counter() - self.steps_from, 1e-9)
        out = {"data_wait": round(self.waited / span, 4), "data_wait_s": round(self.waited, 3),
               "first_batch_s": round(self.first_wait, 3)}
        busy = span - self.waited
        if self.images and busy > 0:
            out["train_img_s"] = round(self.images / busy, 3)
        if self.timed and self.made > 0:
            out["loader_img_s"] = round(max(1, workers) * self.timed / self.made, 3)
            if "train_img_s" in out:
                out["loader_ratio"] = float(f"{out['loader_img_s'] / out['train_img_s']:.4g}")
        return out


FEED_WAIT = 0.1
"""The share of an epoch spent waiting for data above which the trainer warns."""

FEED_WAIT_S = 0.5
"""...and the seconds: an epoch that lost less to its loader is not worth a warning."""


def feed_warning(stage: str, epoch: int, metrics: dict[str, Any], workers: int) -> str | None:
    """A warning when the steps waited for data more than :data:`FEED_WAIT` of the epoch and
    more than :data:`FEED_WAIT_S` seconds."""
    wait = float(metrics.get("data_wait", 0.0))
    if wait <= FEED_WAIT or float(metrics.get("data_wait_s", 0.0)) <= FEED_WAIT_S:
        return None
    made = (f"the loader makes {metrics['loader_img_s']:.1f} img/s with {workers} worker"
            f"{'s' if workers != 1 else ''}" if "loader_img_s" in metrics else
            f"the loader ({workers} workers)")
    need = f", the steps take {metrics['train_img_s']:.1f}" if "train_img_s" in metrics else ""
    return (f"{stage}: epoch {epoch + 1} waited for data {wait:.0%} of its time: {made}{need}. "
            "Raise data.train.num_workers (if cores are free) or lighten data.train.transforms "
            "(docs/trainer.md, \"Is the loader fast enough?\")")


def _shutdown_workers(batches: Any) -> None:
    """Stop and join a loader iterator's worker processes (an epoch may end before the data)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _batch_size(loader: DataLoader[Any]) -> int:
    """Images per step of one process."""
    size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    return int(size or 1)


@torch.no_grad()
def calibrate(model: nn.Module, loader: DataLoader[Any], batches: int, device: torch.device,
              seed: int | None = None) -> int:
    """Forward ``batches`` batches through ``model`` (eval mode, no gradients); returns how many.

    :param seed: seeds every RNG first (the training transforms draw from them), so a redone
        calibration observes exactly the same batches.
    """
    if seed is not None:
        seed_everything(seed)
    if dist.world_size() > 1 and dist.is_main():  # the single-rank policy (docs/trainer.md)
        tqdm.write(f"calibration: {dist.world_size()} processes each observe the same {batches} "
                   "batches; observer statistics are not reduced across processes, rank 0's are "
                   "saved")
    model.eval()
    done = 0
    with progress(total=batches, desc="calibration") as bar:
        while done < batches:
            for batch in loader:
                model(to_device(batch, device)["img"])
                done += 1
                bar.update(1)
                if done >= batches:
                    break
            if len(loader) == 0:
                break
    return done
