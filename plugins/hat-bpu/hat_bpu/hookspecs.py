"""hat-bpu's own hooks: a third-party plugin adds an activation observer or a march without
touching hat-bpu.

Added to the plugin manager through the core's ``hat_addhooks`` hook. hat-bpu reads them when a
recipe names an observer or a march it does not have itself (``[quantize] observer``,
``[quantize] march``, ``[compile] march``), through the run's plugin manager
(:func:`hat_bpu.pluggable.collect`); a name two plugins give, or one that shadows a built-in, is
an error naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hat_bpu.device.march import March
    from hat_bpu.quant.observers import RangeFn

hookspec = pluggy.HookspecMarker("hat")


@hookspec
def bpu_observers() -> dict[str, RangeFn]:
    """Add activation range observers to hat-bpu's quantizer (``[quantize] observer = NAME``).

    Called when a recipe names an observer hat-bpu does not have. An observer is a range rule
    on the calibration histogram: hat-bpu's ``Observer`` collects, per tensor, the largest
    ``|x|`` and a histogram of ``|x|``; at the end of calibration it calls the rule with
    keywords ``hist`` (``Tensor[2048]`` float64 counts over equal bins of ``[0, hist_max]``),
    ``hist_max`` (float), ``max_abs`` (float, the largest ``|x|`` seen), ``dtype`` (``"int8"``
    or ``"int16"``) and ``pow2`` (the march asks for power-of-two scales), and uses the returned
    clipping value ``amax`` (clamped to ``[0, max_abs]``) for the tensor's scale.

    :returns: observer name -> range rule.
    """
    return {}


@hookspec
def bpu_marches() -> list[March]:
    """Add BPU architectures to hat-bpu's march table (``march = NAME`` in a recipe).

    Called when a recipe, ``hat check`` or ``hat perf`` names a march hat-bpu does not have.
    A :class:`hat_bpu.device.march.March` record drives the quantizer's scale policy
    (``pow2_scales``), the model checker (limits, ``ops``), the compiler (``mac_align``) and the
    performance model (peak, bandwidth, SRAM, overheads, utilisation); ``sources`` says where
    each number comes from. ``dataclasses.replace(get_march("bayes-e"), name=..., ...)`` starts
    from a built-in one.

    :returns: the marches this plugin adds.
    """
    return []
