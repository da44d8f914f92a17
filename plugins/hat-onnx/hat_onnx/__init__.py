"""hat-onnx: every deployed model as ONNX, run by ONNX Runtime (docs/onnx.md).

Written as a third party would: the integer model is read from the documented ``.hbir`` file
(docs/formats.md, :mod:`hat_onnx.hbir`), the float model comes through the core's hooks; no
other HAT plugin is imported.
"""

__version__ = "0.1.0"
