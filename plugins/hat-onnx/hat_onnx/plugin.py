"""hat-onnx's hooks: two stages after export and their predict rows (docs/onnx.md).

``onnx``        needs export: reads the export stage's ``.hbir`` (the documented format,
                :mod:`hat_onnx.hbir`) and writes ``model.int.onnx`` (exact integer form),
                ``model.qdq.onnx`` (QDQ form) and ``onnx.json``; scored by ``onnx_int``
                (ONNX Runtime on ``model.int.onnx``).
``onnx_float``  needs float: the best float model (built through the core's ``build_model``
                hook) as ``model.float.onnx`` via ``torch.onnx.export``; scored by
                ``onnx_float``.

Both are on whenever hat-onnx is installed and their upstream stage is enabled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx

from hat_onnx import hbir, lower
from hat_onnx.runtime import export_float, runner
from hatcore import hookimpl
from hatcore.errors import UserError
from hatcore.stages import Stage

INT_FILE, QDQ_FILE, FLOAT_FILE, DESC_FILE = ("model.int.onnx", "model.qdq.onnx",
                                             "model.float.onnx", "onnx.json")


def convert_file(src: Path, out_dir: Path) -> dict[str, Any]:
    """``src`` (.hbir) → ``out_dir``/model.int.onnx and model.qdq.onnx, both checked."""
    g = hbir.read_hbir(src)
    if len(g.inputs) != 1:
        raise UserError(f"{src}: {len(g.inputs)} graph inputs; a HAT model has one (the image)")
    out_dir.mkdir(parents=True, exist_ok=True)
    desc: dict[str, Any] = {"source": str(src), "march": g.meta.get("march"),
                            "opset": lower.OPSET, "files": {}}
    for form, name in (("int", INT_FILE), ("qdq", QDQ_FILE)):
        model = lower.to_onnx(g, form)
        lower.check(model, g)
        path = out_dir / name
        onnx.save(model, str(path))
        ops: dict[str, int] = {}
        for nd in model.graph.node:
            ops[nd.op_type] = ops.get(nd.op_type, 0) + 1
        desc["files"][name] = {"form": form, "bytes": path.stat().st_size,
                               "nodes": len(model.graph.node), "ops": dict(sorted(ops.items()))}
    return desc


def run_onnx(pipe: Any, stage: Stage) -> dict[str, Any]:
    from hatcore.workdir import write_json

    src = pipe.artifact(stage.needs[0])
    if not src.is_file():
        raise UserError(f"{src} does not exist: run `hat run {pipe.source} --stage "
                        f"{stage.needs[0]}` first")
    if not hbir.is_hbir(src):
        raise UserError(f"{src}: the onnx stage reads .hbir files (docs/formats.md); the "
                        "recipe's exporter wrote another format")
    t0 = time.perf_counter()
    out = pipe.workdir.stage(stage.name)
    desc = convert_file(src, out)
    write_json(out / DESC_FILE, desc)
    pipe.echo(f"onnx: wrote {out / INT_FILE} and {out / QDQ_FILE} from {src} "
              f"({time.perf_counter() - t0:.1f}s, onnx.checker passed)")
    return {"files": sorted(desc["files"])}


def run_onnx_float(pipe: Any, stage: Stage) -> dict[str, Any]:
    model = pipe.load_stage_model(stage.needs[0])
    path = pipe.workdir.stage(stage.name) / FLOAT_FILE
    t0 = time.perf_counter()
    desc = export_float(model, pipe.example_input(), path)
    pipe.echo(f"onnx_float: wrote {path} ({time.perf_counter() - t0:.1f}s, onnx.checker passed)")
    return {"nodes": desc["nodes"]}


def _load(name: str) -> Any:
    def load(pipe: Any, stage: Stage, ckpt: Path | None) -> tuple[Any, Any]:
        if ckpt is not None:
            raise UserError(f"--ckpt applies to trained stages, not to {stage.predict}")
        path = pipe.workdir.stage(stage.name) / name
        if not path.is_file():
            raise UserError(f"{path} does not exist: run `hat run {pipe.source} --stage "
                            f"{stage.name}` first")
        return pipe.build_model().eval(), runner(path)
    return load


def _quantized(recipe: Any) -> bool:
    return bool(recipe.stages.calibration.enabled or recipe.stages.qat.enabled)


@hookimpl
def hat_stages() -> list[Stage]:
    return [
        Stage("onnx", run_onnx, needs=("export",), after="export",
              artifacts=lambda r: (INT_FILE, QDQ_FILE, DESC_FILE), predict="onnx_int",
              load=_load(INT_FILE), deployed=True, enabled=_quantized),
        Stage("onnx_float", run_onnx_float, needs=("float",), after="onnx",
              artifacts=lambda r: (FLOAT_FILE,), predict="onnx_float", load=_load(FLOAT_FILE),
              deployed=True, enabled=lambda r: bool(r.stages.float.enabled)),
    ]


@hookimpl
def describe_file(path: Path) -> str | None:
    path = Path(path)
    if path.suffix != ".onnx" or not path.is_file():
        return None
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError / ValidationError
        raise UserError(f"{path}: not a valid ONNX model ({exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    ops: dict[str, int] = {}
    for nd in model.graph.node:
        ops[nd.op_type] = ops.get(nd.op_type, 0) + 1
    io = [f"input  {i.name}" for i in model.graph.input] + \
         [f"output {o.name}" for o in model.graph.output]
    return "\n".join([f"{path}: ONNX (opset {model.opset_import[0].version}, "
                      f"form {props.get('hat.form', '?')}, onnx.checker ok)",
                      f"nodes: {len(model.graph.node)} ("
                      + ", ".join(f"{k} ×{v}" for k, v in sorted(ops.items())) + ")", *io])
