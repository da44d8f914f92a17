"""The march table: one record per modelled BPU architecture.

The model checker, the quantizer (``pow2_scales``), the compiler (weight layout) and the
performance model all read this one table. Each number says where it comes from: a public
source, or ``ASSUMPTION`` (a plausible value for a modelled device), or says what it was fitted to:
bayes-e's and bernoulli2's utilisation (and bayes-e's overheads) are least-squares fits to
published on-board latencies of public model-zoo networks (``bench/bpu_perf_fit.py``; predicted
vs published in docs/bpu.md).

These describe a *modelled* device, not Horizon's real hardware; perf numbers derived from them
are estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hat_bpu.ir.ops import OPS
from hatcore.errors import UserError

#: every march runs every op of the IR's op table (a march lacking one lists its own ``ops``).
_COMMON_OPS = tuple(OPS)


@dataclass(frozen=True)
class March:
    """One BPU architecture (units in the field names).

    :param name: the march name used in recipes (``[compile] march``).
    :param device: the boards/SoCs it stands for.
    :param peak_tops_int8: peak int8 tera-operations/s (1 MAC = 2 ops).
    :param ddr_gbps: DDR bandwidth available to the BPU, GB/s.
    :param sram_kib: on-chip SRAM, KiB (a layer whose working set fits does not spill to DDR).
    :param clock_mhz: BPU clock.
    :param mac_align: (input-channel, output-channel) alignment of the MAC array: channels are
        padded up to these multiples (compute utilisation and weight layout).
    :param max_kernel: largest conv kernel side.
    :param max_stride: largest conv stride.
    :param max_channels: largest conv input/output channel count.
    :param max_tensor_bytes: largest single feature map (int8 bytes).
    :param pow2_scales: the march requantizes by shifts only: power-of-two scales (only
        ``bernoulli``, as Horizon's ``pow_quantization()``).
    :param layer_overhead_us: fixed cost per layer (scheduling, descriptor fetch).
    :param frame_overhead_us: fixed cost per frame (input DMA setup, interrupt, output).
    :param peak_utilisation: best MAC utilisation reached by a well-aligned 3×3 conv.
    :param depthwise_efficiency: utilisation factor of a depthwise conv relative to dense.
    :param int16_passes: MAC passes of a conv whose input is int16 (an int16 operand split into
        two 8-bit halves on an int8 array); vector ops with an int16 tensor run at half rate too.
        ASSUMPTION (the modelled device's rule; Horizon does not publish int16 throughput).
    :param ops: IR ops run on the BPU.
    :param sources: where each number comes from.
    """

    name: str
    device: str
    peak_tops_int8: float
    ddr_gbps: float
    sram_kib: int
    clock_mhz: int
    mac_align: tuple[int, int]
    max_kernel: int
    max_stride: int
    max_channels: int
    max_tensor_bytes: int
    pow2_scales: bool
    layer_overhead_us: float
    frame_overhead_us: float
    peak_utilisation: float
    depthwise_efficiency: float
    int16_passes: int = 2
    ops: tuple[str, ...] = _COMMON_OPS
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: name, device, peak, bandwidth."""
        return (f"{self.name} ({self.device}): {self.peak_tops_int8:g} TOPS int8, "
                f"{self.ddr_gbps:g} GB/s DDR, {self.sram_kib} KiB SRAM, {self.clock_mhz} MHz")


_MARCHES: dict[str, March] = {
    "bernoulli": March(
        name="bernoulli", device="Sunrise 2 / Journey 2 (X2/J2)",
        peak_tops_int8=4.0, ddr_gbps=12.8, sram_kib=1024, clock_mhz=1000,
        mac_align=(8, 8), max_kernel=7, max_stride=2, max_channels=2048,
        max_tensor_bytes=16 << 20, pow2_scales=True,
        layer_overhead_us=20.0, frame_overhead_us=300.0,
        peak_utilisation=0.5, depthwise_efficiency=0.15,
        sources={
            "pow2_scales": "public: horizon_plugin_pytorch qat_mode helpers, "
                           "pow_quantization() is march == March.BERNOULLI",
            "peak_tops_int8": "public: Horizon Robotics Journey 2 / Sunrise 2 announcements "
                              "(4 TOPS equivalent, Bernoulli BPU)",
            "ddr_gbps": "ASSUMPTION (as bernoulli2)",
            "clock_mhz": "ASSUMPTION",
            "sram_kib": "ASSUMPTION",
            "mac_align": "ASSUMPTION",
            "limits": "ASSUMPTION (as bernoulli2)",
            "overheads": "ASSUMPTION",
            "utilisation": "ASSUMPTION",
        }),
    "bernoulli2": March(
        name="bernoulli2", device="Sunrise X3 / Journey 3 (RDK X3)",
        peak_tops_int8=5.0, ddr_gbps=12.8, sram_kib=1024, clock_mhz=1000,
        mac_align=(8, 8), max_kernel=7, max_stride=2, max_channels=2048,
        max_tensor_bytes=16 << 20, pow2_scales=False,
        layer_overhead_us=15.0, frame_overhead_us=300.0,
        peak_utilisation=0.2268, depthwise_efficiency=0.3635,
        sources={
            "peak_tops_int8": "public: Horizon Robotics Sunrise 3 / Journey 3 product pages and "
                              "RDK X3 spec sheet (5 TOPS equivalent, dual-core Bernoulli 2.0 BPU)",
            "ddr_gbps": "public: RDK X3 spec (LPDDR4 3200 MT/s, 32-bit) → 12.8 GB/s theoretical",
            "clock_mhz": "public: RDK X3 docs (BPU 1.0 GHz)",
            "pow2_scales": "public: horizon_plugin_pytorch pow_quantization() is true only for "
                           "March.BERNOULLI; bernoulli2 requantizes with multipliers "
                           "(functional_impl._add bernoulli2 branch: int8 / 15-bit weights)",
            "sram_kib": "ASSUMPTION",
            "mac_align": "ASSUMPTION",
            "limits": "ASSUMPTION (modelled on OpenExplorer's X3 operator constraints list)",
            "overheads": "ASSUMPTION (too few public points to fit them)",
            "utilisation": "fitted by least squares to 3 published RDK X3 latencies (ResNet18, "
                           "MobileNetV1/V2, D-Robotics rdk_model_zoo; bench/bpu_perf_fit.py, "
                           "leave-one-out error in docs/bpu.md)",
        }),
    "bayes": March(
        name="bayes", device="Journey 5 (J5)",
        peak_tops_int8=128.0, ddr_gbps=51.2, sram_kib=8192, clock_mhz=1200,
        mac_align=(32, 32), max_kernel=15, max_stride=4, max_channels=8192,
        max_tensor_bytes=64 << 20, pow2_scales=False,
        layer_overhead_us=4.0, frame_overhead_us=150.0,
        peak_utilisation=0.35, depthwise_efficiency=0.05,
        sources={
            "peak_tops_int8": "public: Horizon Robotics Journey 5 announcement (128 TOPS)",
            "ddr_gbps": "ASSUMPTION (LPDDR4X, 2×32-bit at 6400 MT/s → 51.2 GB/s)",
            "clock_mhz": "ASSUMPTION",
            "sram_kib": "ASSUMPTION",
            "mac_align": "ASSUMPTION",
            "limits": "ASSUMPTION",
            "overheads": "ASSUMPTION",
            "utilisation": "ASSUMPTION",
        }),
    "bayes-e": March(
        name="bayes-e", device="Sunrise X5 (RDK X5)",
        peak_tops_int8=10.0, ddr_gbps=17.0, sram_kib=2048, clock_mhz=1000,
        mac_align=(16, 16), max_kernel=15, max_stride=4, max_channels=8192,
        max_tensor_bytes=32 << 20, pow2_scales=False,
        layer_overhead_us=6.733, frame_overhead_us=0.0,
        peak_utilisation=0.2748, depthwise_efficiency=0.2838,
        sources={
            "peak_tops_int8": "public: D-Robotics RDK X5 spec sheet (10 TOPS BPU, Bayes-e)",
            "ddr_gbps": "ASSUMPTION (LPDDR4 4266 MT/s, 32-bit → 17 GB/s)",
            "clock_mhz": "ASSUMPTION",
            "sram_kib": "ASSUMPTION",
            "mac_align": "ASSUMPTION",
            "limits": "ASSUMPTION",
            "overheads": "fitted by least squares with the utilisation to 8 published RDK X5 "
                         "latencies (ResNet18, RepVGG, MobileOne, YOLOv5u/v8; D-Robotics "
                         "rdk_model_zoo), checked on 8 others (bench/bpu_perf_fit.py, docs/bpu.md)",
            "utilisation": "fitted (see overheads)",
        }),
}

MARCHES: tuple[str, ...] = tuple(_MARCHES)
"""hat-bpu's own marches; plugins add more through ``bpu_marches`` (:func:`march_names`)."""


def plugin_marches() -> dict[str, tuple[str, March]]:
    """The marches the loaded plugins add: ``name -> (plugin, record)``.

    :raises UserError: a name given twice or shadowing a built-in one, or a record that is not
        a :class:`March`.
    """
    from hat_bpu.pluggable import collect

    found = collect("bpu_marches", MARCHES, "march")
    for plugin, m in found.values():
        if not isinstance(m, March):
            raise UserError(f"plugin {plugin!r}: bpu_marches returned {m!r}, not a "
                            "hat_bpu.device.march.March")
    return found


def march_names() -> tuple[str, ...]:
    """Every march a recipe may name: hat-bpu's, then the loaded plugins'."""
    return MARCHES + tuple(plugin_marches())


def get_march(name: str) -> March:
    """The march record called ``name``: hat-bpu's own, else one a loaded plugin adds.

    :raises UserError: an unknown march, listing the known ones (with the plugin of each added
        one).
    """
    if name in _MARCHES:
        return _MARCHES[name]
    added = plugin_marches()
    if name in added:
        return added[name][1]
    known = [*MARCHES, *(f"{n} (plugin {p})" for n, (p, _) in added.items())]
    raise UserError(f"unknown march {name!r}; expected one of {', '.join(known)}")
