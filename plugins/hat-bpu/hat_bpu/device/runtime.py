"""The runtime of ``.hbm`` files: executes the compiled device program on the host.

It loads and verifies the file, allocates the program's buffers once, and runs its
instructions with its own integer kernels (:mod:`hat_bpu.device.kernels`) on the padded weight
and activation layout, each instruction writing its output into the buffer the compiler
assigned. It shares no code with the integer simulator (``int_infer``): that the two agree bit
for bit on the same input is what ``align_bpu``'s tests check (tests/test_deploy_program.py).
``board_runner`` adds the board's input path (:func:`hat_bpu.device.nv12.board_input`) and runs
one image at a time, as the device does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from hat_bpu.device import hbm, kernels, nv12
from hat_bpu.device.program import Program
from hat_bpu.ir import hbir
from hatcore.errors import UserError

_TORCH = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


def plain_tree(tree: Any) -> Any:
    """``tree`` with torch.fx's immutable lists/dicts (recorded when the model's output was
    traced) turned back into the plain ``list``/``dict`` the float model's ``forward`` returns."""
    if isinstance(tree, (list, immutable_list)):
        return [plain_tree(v) for v in tree]
    if isinstance(tree, (dict, immutable_dict)):
        return {k: plain_tree(v) for k, v in tree.items()}
    if type(tree) is tuple:
        return tuple(plain_tree(v) for v in tree)
    return tree


class Runtime:
    """A loaded ``.hbm``: ``Runtime(path).run(x) -> flat float32 outputs`` for Tensor[N,3,H,W].

    :param arith: ``"i64"`` runs every epilogue stage in int64 whatever the compiler proved
        (tests use it to check both arithmetic paths); None: as compiled.
    :param threads: torch's intra-op threads while a program runs (restored after); None: the
        process's. One image's instructions are small (the demo's 192² FCOS: ~190 instructions
        in 40-50 ms), so a second thread pays little and, under ``OMP_WAIT_POLICY=PASSIVE``
        (hat's choice on a busy machine), costs: align_bpu on the demo's 64 images took 9.0 s on 2 threads,
        4.1 s on 1 (3.3 s on 2 spinning threads of a free machine; bench/RESULTS-deploy.md).
    """

    def __init__(self, path: Path, arith: str | None = None, threads: int | None = 1) -> None:
        self.threads = threads
        self.header, self.program = hbm.load_hbm(Path(path))
        prog = self.program
        try:
            if arith is not None:
                for ins in prog.instrs:
                    for st in ins.stages:
                        st.arith = arith
                    if ins.op == "concat":
                        ins.attrs["arith"] = [arith] * len(ins.inputs)
            self._buffers = [torch.zeros(n, dtype=torch.uint8) for n in prog.buffers]
            self._views = {name: self._view(name) for name in prog.lifetimes()}
            self._steps = [kernels.build(ins, prog.tensors) for ins in prog.instrs]
            tree = prog.meta.get("output_tree")
            self._spec = None if tree is None else pytree.treespec_loads(tree)
            # one dry run on a zero image: shapes are value-independent, so a program that
            # runs once runs on every input
            self.run_int(torch.zeros(prog.tensors[prog.input].shape))
        except (*hbir.MALFORMED, RuntimeError, NotImplementedError) as exc:
            raise UserError(f"{path}: the program cannot be loaded: {exc}") from None

    def _view(self, name: str) -> torch.Tensor:
        info = self.program.tensors[name]
        assert info.buffer is not None
        raw = self._buffers[info.buffer][:info.nbytes].view(_TORCH[info.dtype])
        if len(info.stored) == 4:  # NHWC in the buffer, seen as NCHW (channels-last strides)
            n, c, h, w = info.stored
            return raw.view(n, h, w, c).permute(0, 3, 1, 2)
        return raw.view(info.stored)

    @torch.no_grad()
    def run_int(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The device's integer outputs (logical shapes, int64) for one image ``x``
        (Tensor[1, 3, H, W], normalised), in the order of ``program.outputs``."""
        prog = self.program
        want = prog.tensors[prog.input].shape
        if list(x.shape) != want:
            raise UserError(f"the compiled program takes one image of shape {want}, got "
                            f"{list(x.shape)} (compile for this input size)")
        env = dict(self._views)
        env[prog.input] = x.detach().cpu().to(torch.float32)
        for ins, step in zip(prog.instrs, self._steps, strict=True):
            self._views[ins.output].copy_(step(env))
        return [kernels.logical(self._views[o.tensor], prog.tensors[o.tensor]).to(torch.int64)
                for o in prog.outputs]

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Flat float32 outputs for a batch: each image through the program, the host's
        dequantization ``float32(q · scale)`` (product in float64), concatenated on the batch."""
        outs = []
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for i in range(x.shape[0]):
                ints = self.run_int(x[i:i + 1])
                outs.append([(q.to(torch.float64) * o.scale).to(torch.float32)
                             for q, o in zip(ints, self.program.outputs, strict=True)])
        finally:
            torch.set_num_threads(before)
        return [torch.cat([o[k] for o in outs], 0) for k in range(len(self.program.outputs))]

    def __call__(self, x: torch.Tensor) -> Any:
        """The model's output structure (``output_tree``) of float32 tensors."""
        flat = self.run(x)
        if self._spec is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        return plain_tree(pytree.tree_unflatten(flat, self._spec))


def board_runner(path: Path) -> Callable[[Any], Any]:
    """``align_bpu``: batch → board input path (NV12 when the program's input is nv12) → runtime."""
    rt = Runtime(path)
    use_nv12 = rt.header.get("input_layout", "nv12") == "nv12"

    def run(batch: Any) -> Any:
        img = batch["img"] if isinstance(batch, dict) else batch
        x = nv12.board_input(img) if use_nv12 else img.detach().cpu().float()
        out = rt(x)
        return pytree.tree_map(lambda t: t.to(img.device) if isinstance(t, torch.Tensor) else t,
                               out)
    return run


__all__ = ["Program", "Runtime", "board_runner", "plain_tree"]
