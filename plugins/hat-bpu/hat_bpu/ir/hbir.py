"""The ``.hbir`` file: an integer graph (:mod:`hat_bpu.ir`) on disk, without pickle.

Layout (all integers little-endian; described in docs/formats.md, format version 1)::

    magic      8 bytes  b"HATHBIR\\0"
    version    uint32   HBIR_VERSION
    head_len   uint64   length of the JSON header
    header     head_len bytes of UTF-8 JSON
    body       the raw arrays, each at a 64-byte aligned offset (little-endian, C order)

The header holds ``meta``, ``inputs``, ``outputs``, ``tensors`` (name, shape, dtype, scale),
``nodes`` (op, name, inputs, outputs, attrs, params as ``{name: {dtype, shape, offset}}``),
``body_len`` and ``body_sha256`` (verified on every load).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from hat_bpu.ir import graph as ir
from hatcore.errors import UserError

MAGIC = b"HATHBIR\0"
HBIR_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_ALIGN = 64
PARAM_DTYPES = ("int8", "int16", "int32", "int64", "float32", "float64")


def pack_arrays(arrays: list[np.ndarray]) -> tuple[bytes, list[int]]:
    """Concatenate arrays (little-endian, C order, 64-byte aligned); returns (body, offsets)."""
    chunks: list[bytes] = []
    offsets: list[int] = []
    pos = 0
    for a in arrays:
        pad = (-pos) % _ALIGN
        chunks.append(b"\0" * pad)
        pos += pad
        offsets.append(pos)
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        chunks.append(raw)
        pos += len(raw)
    return b"".join(chunks), offsets


def array_at(body: bytes, dtype: str, shape: list[int], offset: int, where: str) -> np.ndarray:
    """The array stored at ``offset`` of ``body`` (a copy, native byte order)."""
    if dtype not in PARAM_DTYPES:
        raise UserError(f"{where}: unknown array dtype {dtype!r}")
    dt = np.dtype(dtype).newbyteorder("<")
    n = int(np.prod(shape)) if shape else 1
    end = offset + n * dt.itemsize
    if offset < 0 or end > len(body):
        raise UserError(f"{where}: array runs past the end of the file (truncated?)")
    return np.frombuffer(body, dt, n, offset).astype(dtype).reshape(shape)


def write_container(path: Path, magic: bytes, version: int, header: dict[str, Any],
                    body: bytes) -> None:
    """Write ``magic | version | head_len | JSON header | body`` (header gains the body hash)."""
    header = dict(header, body_len=len(body), body_sha256=hashlib.sha256(body).hexdigest())
    head = json.dumps(header, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(_PREFIX.pack(magic, version, len(head)))
        f.write(head)
        f.write(body)


def read_container(path: Path, magic: bytes, versions: tuple[int, ...]
                   ) -> tuple[int, dict[str, Any], bytes]:
    """Read and verify a container; returns (version, header, body).

    :raises UserError: wrong magic, unknown version, truncated file or checksum mismatch.
    """
    data = Path(path).read_bytes()
    if len(data) < _PREFIX.size:
        raise UserError(f"{path}: file is truncated ({len(data)} bytes)")
    got_magic, version, head_len = _PREFIX.unpack_from(data)
    if got_magic != magic:
        raise UserError(f"{path}: not a {magic.rstrip(bytes(1)).decode()} file (bad magic)")
    if version not in versions:
        raise UserError(f"{path}: format version {version} is not supported (known: {versions})")
    end = _PREFIX.size + head_len
    if end > len(data):
        raise UserError(f"{path}: file is truncated (header runs past the end)")
    try:
        header = json.loads(data[_PREFIX.size:end])
    except ValueError:
        raise UserError(f"{path}: header is not valid JSON (damaged file)") from None
    body = data[end:]
    if len(body) != header.get("body_len"):
        raise UserError(f"{path}: file is truncated or padded: body is {len(body)} bytes, "
                        f"header says {header.get('body_len')} (checksum mismatch)")
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise UserError(f"{path}: checksum mismatch: the body's sha256 differs from the header "
                        "(tampered or damaged file)")
    return version, header, body


def graph_to_header(graph: ir.Graph) -> tuple[dict[str, Any], bytes]:
    """The JSON header and body of ``graph``."""
    arrays: list[np.ndarray] = []
    nodes = []
    for n in graph.nodes:
        params = {}
        for k, a in n.params.items():
            a = np.asarray(a)
            if str(a.dtype) not in PARAM_DTYPES:
                raise ValueError(f"node {n.name!r}: param {k!r} has dtype {a.dtype}")
            params[k] = {"dtype": str(a.dtype), "shape": list(a.shape), "index": len(arrays)}
            arrays.append(a)
        nodes.append({"op": n.op, "name": n.name, "inputs": n.inputs, "outputs": n.outputs,
                      "attrs": n.attrs, "params": params})
    body, offsets = pack_arrays(arrays)
    for nd in nodes:
        for p in nd["params"].values():
            p["offset"] = offsets[p.pop("index")]
    tensors = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "scale": t.scale}
               for t in graph.tensors.values()]
    header = {"format": "hbir", "meta": graph.meta, "inputs": graph.inputs,
              "outputs": graph.outputs, "tensors": tensors, "nodes": nodes}
    return header, body


def graph_from_header(header: dict[str, Any], body: bytes, where: str) -> ir.Graph:
    """Rebuild the graph written by :func:`graph_to_header`."""
    try:
        tensors = {t["name"]: ir.Tensor(t["name"], list(t["shape"]), t["dtype"], t["scale"])
                   for t in header["tensors"]}
        nodes = [ir.Node(nd["op"], nd["name"], list(nd["inputs"]), list(nd["outputs"]),
                         dict(nd["attrs"]),
                         {k: array_at(body, p["dtype"], p["shape"], p["offset"],
                                      f"{where}: node {nd['name']!r} param {k!r}")
                          for k, p in nd["params"].items()})
                 for nd in header["nodes"]]
        graph = ir.Graph(tensors, nodes, list(header["inputs"]), list(header["outputs"]),
                         dict(header["meta"]))
    except (KeyError, TypeError) as exc:
        raise UserError(f"{where}: malformed header ({exc!r} missing or wrong)") from None
    try:
        graph.validate()
    except ValueError as exc:
        raise UserError(f"{where}: invalid graph: {exc}") from None
    return graph


def save_hbir(graph: ir.Graph, path: Path) -> dict[str, Any]:
    """Write ``graph`` as ``.hbir``; returns the JSON-able description (graph summary + file)."""
    header, body = graph_to_header(graph)
    write_container(Path(path), MAGIC, HBIR_VERSION, header, body)
    return {"format": "hbir", "version": HBIR_VERSION, "path": str(path),
            "bytes": Path(path).stat().st_size, "march": graph.meta.get("march"),
            **graph.summary()}


def load_hbir(path: Path) -> ir.Graph:
    """Read a ``.hbir`` back (verifying magic, version and checksum).

    :raises UserError: a damaged, truncated or foreign file.
    """
    _, header, body = read_container(Path(path), MAGIC, (HBIR_VERSION,))
    return graph_from_header(header, body, str(path))


def has_magic(path: Path, magic: bytes) -> bool:
    """True when ``path`` is a readable file starting with ``magic`` (.hbir and .hbm)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def is_hbir(path: Path) -> bool:
    """True when ``path`` starts with the ``.hbir`` magic."""
    return has_magic(path, MAGIC)


def describe_graph(graph: ir.Graph) -> str:
    """A few human-readable lines: ops, params, inputs/outputs with shapes and dtypes."""
    s = graph.summary()
    ops = ", ".join(f"{k} ×{v}" for k, v in sorted(s["ops"].items()))
    lines = [f"march: {graph.meta.get('march')}  pow2_scales: {graph.meta.get('pow2_scales')}",
             f"nodes: {s['nodes']} ({ops})", f"parameters: {s['param_bytes']} bytes"]
    for t in graph.inputs:
        lines.append(f"input  {t}: {graph.tensors[t].shape} float32")
    for t in graph.outputs:
        src = graph.tensors[graph.producer(t).inputs[0]] if graph.producer(t) else None
        lines.append(f"output {t}: {graph.tensors[t].shape} (from {src.dtype if src else '?'})")
    return "\n".join(lines)
