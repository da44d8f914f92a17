"""The real FCOS-EfficientNet from hat-fcos (when installed): quantize, calibrate, convert."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hat_bpu.ir.reference import run_ir
from hat_bpu.plugin import HorizonQuantizeSpec
from hat_bpu.plugin import quantize as quantize_hook
from hat_bpu.quant.convert import convert
from torch.utils import _pytree as pytree

from hatcore import quant


def quantize(**kw: Any) -> Any:
    """The hook with the default [target] (bayes-e)."""
    return quantize_hook(target=None, **kw)


def test_fcos_quantizes_and_converts_bit_exact() -> None:
    pytest.importorskip("hat_fcos")
    from hatcore.plugins import make_plugin_manager
    from hatcore.recipe import ModelSpec, make_converter

    plugins = make_plugin_manager(only={"fcos"})  # built through the hook; never imported here
    spec = make_converter(plugins.registry).structure({"type": "fcos", "num_classes": 4}, ModelSpec)
    torch.manual_seed(0)
    model = plugins.hook.build_model(spec=spec, plugins=plugins).eval()
    x = torch.randint(0, 256, (1, 3, 128, 128)).float().sub(128).div(128)
    q = quantize(model=model, spec=HorizonQuantizeSpec(type="horizon", observer="minmax"),
                 stage="calibration")
    quant.set_mode(q, "observe")
    with torch.no_grad():
        q(x)
    quant.set_mode(q, "fake_quant")
    assert callable(q.compute_loss) and callable(q.postprocess)
    with warnings.catch_warnings():  # random heads: bias saturation is expected and reported
        warnings.simplefilter("ignore")
        graph = convert(q, x)
    with torch.no_grad():
        ref = pytree.tree_leaves(q(x))
    got = run_ir(graph, x.numpy())
    assert len(got) == len(ref) == 15  # cls, box, centerness × 5 levels
    assert all(np.array_equal(g, r.numpy()) for g, r in zip(got, ref, strict=True))
    assert {graph.tensors[graph.producer(o).inputs[0]].dtype for o in graph.outputs} == {"int16"}
    fresh = quantize(model=plugins.hook.build_model(spec=spec, plugins=plugins).eval(),
                     spec=HorizonQuantizeSpec(type="horizon", observer="minmax"), stage="qat")
    fresh.load_state_dict(q.state_dict())
    quant.set_mode(fresh, "fake_quant")
    with torch.no_grad():
        again = pytree.tree_leaves(fresh.eval()(x))
    assert all(torch.equal(a, b) for a, b in zip(again, ref, strict=True))
