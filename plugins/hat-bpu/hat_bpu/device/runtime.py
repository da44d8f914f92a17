"""The reference runtime of ``.hbm`` files (what the board would run, modelled on the host).

It loads and verifies the file, rebuilds the program with the march-laid-out weights cut back to
their logical shapes, and executes the instructions with the simulator's exact integer kernels,
so its raw outputs are bit-identical to ``int_infer`` on the same input tensor (tested).
``board_runner`` adds the board's input path (:func:`hat_bpu.nv12.board_input`) and runs one
image at a time, as the device does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from hat_bpu.device import hbm, nv12
from hat_bpu.ir.simulator import Simulator


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
    """A loaded ``.hbm``: ``Runtime(path).run(x) -> flat float32 outputs`` for Tensor[N,3,H,W]."""

    def __init__(self, path: Path) -> None:
        self.header, graph = hbm.load_hbm(Path(path))
        self.graph = graph
        self._exec = Simulator(graph)

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Execute the program on the normalised input (one or more images)."""
        return self._exec.run(x)

    def __call__(self, x: torch.Tensor) -> Any:
        """The model's output structure, one image at a time, concatenated on the batch axis."""
        outs = [self.run(x[i:i + 1]) for i in range(x.shape[0])]
        flat = [torch.cat([o[k] for o in outs], 0) for k in range(len(outs[0]))]
        return plain_tree(self.graph.unflatten_outputs(flat))


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
