"""ONNX Runtime sessions as HAT runners, and the float model's ONNX export."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hatcore.errors import UserError

TREE_KEY = "hat.output_tree"


def session(path: Path | str | bytes, threads: int = 0) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU (``threads`` 0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    src = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise UserError(f"{path if not isinstance(path, bytes) else 'model'}: ONNX Runtime "
                        f"cannot load it: {exc}") from None


def _plain(tree: Any) -> Any:
    """torch.fx's immutable lists/dicts (recorded in traced output specs) as plain containers."""
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if type(tree) is tuple:
        return tuple(_plain(v) for v in tree)
    return tree


def unflatten(values: list[torch.Tensor], tree: str) -> Any:
    """Rebuild the model's ``forward`` output structure from the flat outputs."""
    if not tree:
        return values[0] if len(values) == 1 else tuple(values)
    import torch.fx  # noqa: F401  (registers fx's immutable containers with pytree)
    from torch.utils import _pytree as pytree

    return _plain(pytree.tree_unflatten(list(values), pytree.treespec_loads(tree)))


def runner(path: Path) -> Callable[[Any], Any]:
    """``runner(batch) -> raw``: the ONNX model at ``path`` on ``batch["img"]``, as the float
    model's ``forward`` returns it (the structure stored in the model's ``hat.output_tree``)."""
    sess = session(path)
    props = sess.get_modelmeta().custom_metadata_map
    tree = props.get(TREE_KEY, "")
    name = sess.get_inputs()[0].name

    def run(batch: Any) -> Any:
        img = batch["img"] if isinstance(batch, dict) else batch
        if not isinstance(img, torch.Tensor) or img.dim() != 4:
            raise UserError("an ONNX runner needs batch['img'] as Tensor[B, 3, H, W]")
        outs = sess.run(None, {name: img.detach().cpu().float().numpy()})
        return unflatten([torch.from_numpy(np.asarray(o)).to(img.device) for o in outs], tree)
    return run


def export_float(model: nn.Module, example_input: torch.Tensor, path: Path) -> dict[str, Any]:
    """``model`` (float, eval) as ONNX via ``torch.onnx.export`` (batch dimension ``N``).

    The output structure of ``forward`` is stored as ``hat.output_tree`` in the model's metadata
    (the pytree spec), so :func:`runner` gives back what the model returns.
    """
    import onnx
    from torch.utils import _pytree as pytree

    model = model.cpu().eval()
    x = example_input.cpu().float()
    with torch.no_grad():
        flat, spec = pytree.tree_flatten(model(x))
    if not all(isinstance(t, torch.Tensor) for t in flat):
        raise UserError("the float model's forward returns non-tensor leaves; ONNX export needs "
                        "tensors only")
    names = [f"out{i}" for i in range(len(flat))]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter warns it is legacy
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (x,), str(path), input_names=["img"], output_names=names,
                              dynamic_axes={"img": {0: "N"}, **{n: {0: "N"} for n in names}},
                              opset_version=18, dynamo=False)
    except Exception as exc:  # torch's exporter raises many types; name the model
        raise UserError(f"torch.onnx.export cannot export the float model "
                        f"({type(model).__name__}): {exc}") from None
    m = onnx.load(str(path))
    onnx.helper.set_model_props(m, {TREE_KEY: pytree.treespec_dumps(spec), "hat.form": "float"})
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return {"path": str(path), "bytes": path.stat().st_size, "outputs": len(names),
            "opset": 18, "nodes": len(m.graph.node)}
