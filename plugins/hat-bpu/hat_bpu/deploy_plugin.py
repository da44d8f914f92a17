"""hat-bpu deploy hooks: HBIR export, integer simulator, compiler, runtime, checker, perf."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import click
import torch
from torch import nn

from hat_bpu import hbir
from hat_bpu.march import MARCHES, get_march
from hatcore import hookimpl
from hatcore.errors import UserError
from hatcore.recipe import CompileSpec, ExportSpec, option, spec
from hatcore.registry import Register


@spec
class HbirExportSpec(ExportSpec):
    """``[export]`` with ``type = "hbir"`` (the default exporter)."""

    artifact: ClassVar[str] = "model.hbir"

    march: str = option("bayes-e", doc=f"BPU architecture recorded in the file ({', '.join(MARCHES)})")
    input_layout: Literal["yuv444", "nv12"] = option(
        "nv12", doc="the board's input: nv12 (the camera path; align_bpu converts as the device "
        "does) or yuv444")


@spec
class HbmCompileSpec(CompileSpec):
    """``[compile]`` with ``type = "hbm"`` (the default compiler)."""

    artifact: ClassVar[str] = "model.hbm"

    march: str = option("bayes-e", doc=f"BPU architecture ({', '.join(MARCHES)})")

    opt_level: int = option(2, doc="0: no layout work; 1: channel padding; 2: + fusion of "
                            "requantize/relu into the producing conv where the IR allows")
    input_layout: Literal["yuv444", "nv12"] = option(
        "nv12", doc="input of the compiled program (align_bpu's board input path)")


@hookimpl
def hat_components(register: Register) -> None:
    register("exporter", "hbir", HbirExportSpec,
             "integer graph of the quantized model as a versioned .hbir (graph, weights, "
             "quant params)", default=True)
    register("compiler", "hbm", HbmCompileSpec,
             "modelled BPU compiler: .hbm program + per-layer performance estimate", default=True)


@hookimpl
def export(model: nn.Module, spec: ExportSpec, path: Path, example_input: torch.Tensor
           ) -> dict[str, Any] | None:
    if not isinstance(spec, HbirExportSpec):
        return None
    from hat_bpu.convert import convert

    get_march(spec.march)
    graph = convert(model, example_input, march=spec.march)
    graph.meta["input_layout"] = spec.input_layout
    return hbir.save_hbir(graph, Path(path))


@hookimpl
def check_model(model: nn.Module, spec: CompileSpec, example_input: torch.Tensor
                ) -> dict[str, Any] | None:
    if not isinstance(spec, HbmCompileSpec):
        return None
    from hat_bpu.checker import check

    return {"target": spec.march, **check(model, get_march(spec.march), example_input[:1])}


@hookimpl
def register_commands(cli: click.Group) -> None:
    from hat_bpu.deploy_commands import register

    register(cli)


@hookimpl
def compile(artifact: Path, spec: CompileSpec, out_dir: Path) -> dict[str, Any] | None:
    if not isinstance(spec, HbmCompileSpec):
        return None
    from hat_bpu.hbm import compile_file

    if not hbir.is_hbir(Path(artifact)):
        raise UserError(f"{artifact}: not an .hbir file; run the export stage first")
    return compile_file(Path(artifact), spec.march, Path(out_dir), spec.opt_level,
                        spec.input_layout)


def _batch_img(batch: Any) -> torch.Tensor:
    img = batch["img"] if isinstance(batch, dict) else batch
    if not isinstance(img, torch.Tensor) or img.dim() != 4:
        raise UserError("a deployed runner needs batch['img'] as Tensor[B, 3, H, W]")
    return img


def _to_device(tree: Any, device: torch.device) -> Any:
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


@hookimpl
def load_deployed(path: Path, stage: str) -> Callable[[Any], Any] | None:
    path = Path(path)
    if stage == "int_infer" and hbir.is_hbir(path):
        from hat_bpu.runtime import plain_tree
        from hat_bpu.simulator import Simulator

        sim = Simulator(hbir.load_hbir(path))

        def run_int(batch: Any) -> Any:
            img = _batch_img(batch)
            return _to_device(plain_tree(sim(img)), img.device)
        return run_int
    if stage == "align_bpu" and _is_hbm(path):
        from hat_bpu.runtime import board_runner

        return board_runner(path)
    return None


def _is_hbm(path: Path) -> bool:
    try:
        from hat_bpu.hbm import is_hbm
    except ImportError:
        return False
    return is_hbm(path)


@hookimpl
def describe_file(path: Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    if hbir.is_hbir(path):
        graph = hbir.load_hbir(path)
        return (f"{path}: HBIR v{hbir.HBIR_VERSION} integer graph (checksum ok)\n"
                + hbir.describe_graph(graph))
    if _is_hbm(path):
        from hat_bpu.hbm import describe_hbm

        return describe_hbm(path)
    return None
