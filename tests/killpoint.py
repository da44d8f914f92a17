"""Run ``hat`` and kill it at a known point of a stage: a test helper, not part of HAT.

    HAT_KILL_AT=STAGE[:N][:INT] python tests/killpoint.py run RECIPE ...

The point is reached through the plugin hooks only (a wrapper plugin registered next to the
installed ones), so the helper does not depend on how the core is laid out inside:

* ``float:N`` / ``qat:N``: before the N-th training forward of that stage's model (1-based),
* ``calibration:N``: before the N-th forward of the model being calibrated,
* ``export``, ``compile``: right after the plugin wrote the artifact, before the stage is
  marked done,
* ``predict``: right after the first predict stage's metric wrote its results.

The process sends itself SIGKILL (``kill -9``: no cleanup, no ``finally``), or SIGINT with
``:INT`` (Ctrl-C). With ``:INT`` the helper first gives SIGINT Python's default handler: a test
run started as a background job of a non-interactive shell (``make test &``) inherits SIGINT
*ignored*, and Python then installs no handler, so the self-sent Ctrl-C would do nothing — a
terminal's Ctrl-C reaches a foreground ``hat`` whose SIGINT is not ignored.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from hatcore import hookimpl
from hatcore.plugins import make_plugin_manager, set_plugins


def die(sig: int) -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


class Killpoint:
    def __init__(self, spec: str) -> None:
        parts = spec.split(":")
        self.sig = signal.SIGINT if parts[-1] == "INT" else signal.SIGKILL
        parts = [p for p in parts if p != "INT"]
        self.stage, self.n = parts[0], int(parts[1]) if len(parts) > 1 else 1
        self.count = 0

    def _arm(self, model: Any, training_only: bool) -> None:
        def pre_forward(module: Any, args: Any) -> None:
            if training_only and not module.training:
                return
            self.count += 1
            if self.count == self.n:
                die(self.sig)

        model.register_forward_pre_hook(pre_forward)

    @hookimpl(wrapper=True)
    def build_model(self, spec: Any) -> Any:
        model = yield
        if self.stage == "float" and model is not None:
            self._arm(model, training_only=True)
        return model

    @hookimpl(wrapper=True)
    def quantize(self, model: Any, spec: Any, stage: str) -> Any:
        result = yield
        if self.stage == stage and result is not None:
            self._arm(result, training_only=stage == "qat")
        return result

    @hookimpl(wrapper=True)
    def export(self, model: Any, spec: Any, path: Any, example_input: Any) -> Any:
        result = yield
        if self.stage == "export":
            die(self.sig)
        return result

    @hookimpl(wrapper=True)
    def compile(self, artifact: Any, spec: Any, out_dir: Any) -> Any:
        result = yield
        if self.stage == "compile":
            die(self.sig)
        return result

    @hookimpl(wrapper=True)
    def build_metric(self, spec: Any, dataset: Any) -> Any:
        metric = yield
        if self.stage == "predict" and metric is not None:
            compute = metric.compute

            def compute_then_die(out_dir: Any = None) -> Any:
                result = compute(out_dir)
                if out_dir is not None:  # a predict stage's own results, not a validation
                    die(self.sig)
                return result

            metric.compute = compute_then_die
        return metric


def main() -> None:
    from hatcore.cli import main as hat_main

    spec = os.environ.get("HAT_KILL_AT")
    if spec:
        point = Killpoint(spec)
        if point.sig == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        set_plugins(make_plugin_manager(extra=[("killpoint", point)]))
    hat_main(sys.argv[1:])


if __name__ == "__main__":
    main()
