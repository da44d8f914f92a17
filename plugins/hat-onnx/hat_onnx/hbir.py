"""A reader of the ``.hbir`` file, written from docs/formats.md alone (no hat-bpu import).

Layout (little-endian)::

    offset 0   magic      8 bytes   b"HATHBIR\\0"
    offset 8   version    uint32    1
    offset 12  head_len   uint64    length of the JSON header
    offset 20  header     UTF-8 JSON: format, meta, inputs, outputs, tensors, nodes,
                                      body_len, body_sha256
               body       raw C-order arrays at the offsets the nodes' params give

The file is verified as every HAT reader does (magic, version, body length, sha256); a damaged
or foreign file is a :class:`hatcore.errors.UserError`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hatcore.errors import UserError

MAGIC = b"HATHBIR\0"
VERSIONS = (1,)
_PREFIX = struct.Struct("<8sIQ")
DTYPES = ("int8", "int16", "int32", "int64", "float32", "float64")
TENSOR_DTYPES = ("int8", "int16", "int32", "float32")


@dataclass
class Tensor:
    name: str
    shape: list[int]
    dtype: str
    scale: float | None


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    params: dict[str, np.ndarray]


@dataclass
class Hbir:
    """The integer graph of a ``.hbir`` file, as its header and body describe it."""

    tensors: dict[str, Tensor]
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def is_hbir(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_hbir(path: Path) -> Hbir:
    """Read and verify ``path``.

    :raises UserError: not an .hbir file, an unknown version, truncated, tampered or malformed.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) < _PREFIX.size:
        raise UserError(f"{path}: file is truncated ({len(data)} bytes)")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise UserError(f"{path}: not an .hbir file (bad magic)")
    if version not in VERSIONS:
        raise UserError(f"{path}: .hbir format version {version} is not supported by hat-onnx "
                        f"(known: {', '.join(map(str, VERSIONS))})")
    end = _PREFIX.size + head_len
    if end > len(data):
        raise UserError(f"{path}: file is truncated (header runs past the end)")
    try:
        header = json.loads(data[_PREFIX.size:end])
    except ValueError:
        raise UserError(f"{path}: header is not valid JSON (damaged file)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: header is not a JSON object (damaged file)")
    body = data[end:]
    if len(body) != header.get("body_len"):
        raise UserError(f"{path}: file is truncated or padded: body is {len(body)} bytes, header "
                        f"says {header.get('body_len')} (checksum mismatch)")
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise UserError(f"{path}: checksum mismatch: the body's sha256 differs from the header "
                        "(tampered or damaged file)")
    try:
        return _graph(header, body, str(path))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise UserError(f"{path}: malformed .hbir header ({exc!r})") from None


def _array(body: bytes, p: dict[str, Any], where: str) -> np.ndarray:
    dtype, shape, offset = p["dtype"], [int(s) for s in p["shape"]], int(p["offset"])
    if dtype not in DTYPES:
        raise UserError(f"{where}: unknown array dtype {dtype!r} (expected one of {DTYPES})")
    dt = np.dtype(dtype).newbyteorder("<")
    n = int(np.prod(shape)) if shape else 1
    if offset < 0 or offset + n * dt.itemsize > len(body):
        raise UserError(f"{where}: array runs past the end of the file (truncated?)")
    return np.frombuffer(body, dt, n, offset).astype(dtype).reshape(shape)


def _graph(header: dict[str, Any], body: bytes, where: str) -> Hbir:
    if header.get("format") != "hbir":
        raise UserError(f"{where}: header format is {header.get('format')!r}, expected 'hbir'")
    tensors = {}
    for t in header["tensors"]:
        if t["dtype"] not in TENSOR_DTYPES:
            raise UserError(f"{where}: tensor {t['name']!r} has dtype {t['dtype']!r} "
                            f"(expected one of {', '.join(TENSOR_DTYPES)})")
        tensors[t["name"]] = Tensor(t["name"], [int(s) for s in t["shape"]], t["dtype"],
                                    None if t["scale"] is None else float(t["scale"]))
    nodes = [Node(nd["op"], nd["name"], list(nd["inputs"]), list(nd["outputs"]), dict(nd["attrs"]),
                  {k: _array(body, p, f"{where}: node {nd['name']!r} param {k!r}")
                   for k, p in nd["params"].items()})
             for nd in header["nodes"]]
    g = Hbir(tensors, nodes, list(header["inputs"]), list(header["outputs"]), dict(header["meta"]),
             where)
    known = set(g.inputs)
    for n in g.nodes:
        for t in n.inputs:
            if t not in known:
                raise UserError(f"{where}: node {n.name!r} reads tensor {t!r} before any node "
                                "writes it (nodes must be in execution order)")
        for t in n.outputs:
            if t not in tensors:
                raise UserError(f"{where}: node {n.name!r} writes tensor {t!r}, which the "
                                "tensors table does not declare")
            known.add(t)
    for t in g.outputs:
        if t not in known:
            raise UserError(f"{where}: graph output {t!r} is never written")
    return g
