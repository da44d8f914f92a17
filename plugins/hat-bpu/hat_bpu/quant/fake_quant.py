"""Fake-quant modules: float tensors carrying exactly the values the integer model computes.

Modes (``hatcore.quant.set_mode``): ``float`` (fresh, identity), ``observe`` (observers collect
ranges, outputs stay float), ``fake_quant`` (scales fixed) and ``qat`` (fake quant; activation
ranges follow a moving average of batch maxima until frozen, or are learned with LSQ).
Gradients are straight-through inside the range and zero outside (torch's fake-quant kernels).
All rounding is half to even, as in :mod:`hat_bpu.quant.qspec`.

The ops that requantize (fused conv, add, concat, standalone activation, constant multiply)
compute what the device computes, in training and in eval (:mod:`hat_bpu.quant.intmath`): the
integer accumulator, the device's multiplier and shift ``m / 2**s``, round half to even, with
straight-through gradients — so QAT trains against the integer model's arithmetic. The one
approximation left is a float32 accumulation where float32 is not provably exact (int8 inputs
with reductions ``K·128·127 >= 2**24``); ``exact_eval`` (off by default) removes it in eval, so
the outputs equal the integer model's bit for bit. QAT with live BN statistics (before
``freeze_bn_epoch``) trains with float fake quant (torch.ao's recipe); LSQ too (learned scales).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hat_bpu import native
from hat_bpu.quant import intmath
from hat_bpu.quant.intmath import fake_quant_weight
from hat_bpu.quant.observers import Observer
from hat_bpu.quant.qspec import act_clip, qrange, scale_from_amax

__all__ = ["ActFQ", "QAct", "QAdd", "QCat", "QConv2d", "QScale", "apply_act", "fake_quant_tensor",
           "fake_quant_weight"]

ACTS = ("none", "relu", "relu6")


def apply_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """``none``/``relu``/``relu6`` on a float tensor."""
    if act == "relu":
        return F.relu(x)
    if act == "relu6":
        return F.relu6(x)
    return x


class _FakeQuantSTE(torch.autograd.Function):
    """``clamp(round(x·(1/s)), qmin, qmax)·s`` with straight-through gradients (CPU path).

    Same values as ``torch.fake_quantize_per_tensor_affine`` (``1/s`` in float32, round half to
    even) and the same gradient mask (``round(x/s)`` inside [qmin, qmax]), ~1.5× faster on CPU.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
        inv = float(np.float32(1.0) / np.float32(scale))  # 1/s rounded to float32
        grad = ctx.needs_input_grad[0]  # eval: no mask to keep
        done = native.fake_quant(x, inv, qmin, qmax, scale, mask=grad)  # one pass, same bits
        if done is not None:
            if done[1] is not None:
                ctx.save_for_backward(done[1])
            return done[0]
        r = (x * inv).round_()  # (the same values as torch.round(x * inv), one tensor less)
        q = r.clamp(qmin, qmax)
        ctx.save_for_backward(r.eq_(q))  # 1.0 where round(x/s) is inside [qmin, qmax]
        return q.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (inside,) = ctx.saved_tensors
        if inside.dtype == torch.uint8:  # the built pass's mask (1/0: the same products)
            done = native.mask_mul(grad, inside)
            if done is not None:
                return done, None, None, None
            inside = inside.float()  # (torch's float × uint8 multiply is ~8× slower)
        return grad * inside, None, None, None


def fake_quant_tensor(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor symmetric fake quant with STE (torch's kernel on GPU, a faster one on CPU).

    Computed in float32 whatever ``x``'s dtype (AMP), and returned in ``x``'s dtype.
    """
    xf = x.float()
    if x.is_cuda:
        zp = torch.zeros((), dtype=torch.int32, device=x.device)
        y = torch.fake_quantize_per_tensor_affine(xf, scale.detach().float(), zp, qmin, qmax)
    else:
        y = _FakeQuantSTE.apply(xf, float(scale), qmin, qmax)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


class ActFQ(nn.Module):
    """Per-tensor symmetric activation fake quantizer with its observer.

    :param dtype: ``int8`` or ``int16``.
    :param observer: observer method (``hat_bpu.quant.observers.OBSERVERS``); ignored with ``fixed_scale``.
    :param pow2: power-of-two scales.
    :param fixed_scale: a scale that never changes (the model input: 1/128).
    :param qat_averaging: QAT moving-average constant for the range (0: scales stay fixed).
    :param lsq: learn the scale in QAT (LSQ), instead of the moving average.
    """

    scale: torch.Tensor
    qat_amax: torch.Tensor
    zero_point: torch.Tensor
    frozen: torch.Tensor

    def __init__(self, dtype: str = "int8", observer: str = "minmax", pow2: bool = False,
                 fixed_scale: float | None = None, qat_averaging: float = 0.01, lsq: bool = False,
                 percentile: float = 99.99, averaging_constant: float = 0.1) -> None:
        super().__init__()
        self.dtype, self.pow2, self.lsq = dtype, pow2, lsq
        self.fixed = fixed_scale is not None
        self.qat_averaging = qat_averaging
        self.qmin, self.qmax = qrange(dtype)
        self.observer = None if self.fixed else Observer(observer, dtype, averaging_constant,
                                                         percentile, pow2)
        init = torch.tensor(float(fixed_scale) if self.fixed else 1.0)
        if lsq and not self.fixed:
            self.scale = nn.Parameter(init)
        else:
            self.register_buffer("scale", init)
        self.register_buffer("qat_amax", torch.tensor(-1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32), persistent=False)
        self.register_buffer("frozen", torch.tensor(False))  # QAT observer freeze (persisted)
        self.mode = "float"

    @property
    def observer_frozen(self) -> bool:
        """True once QAT froze this range (``freeze_observer_epoch``); saved with the weights."""
        return bool(self.frozen)

    @observer_frozen.setter
    def observer_frozen(self, value: bool) -> None:
        self.frozen.fill_(bool(value))

    def hat_set_mode(self, mode: str) -> None:
        """Switch mode; leaving ``observe`` turns the observed range into the scale."""
        if self.mode == "observe" and mode != "observe":
            self.compute_scale()
        if mode == "fake_quant" and self.pow2 and not self.fixed:
            with torch.no_grad():  # e.g. after an EMA averaged the scales: back onto 2**k
                self.scale.copy_(scale_from_amax(self.scale * self.qmax, self.dtype, True))
        self.mode = mode

    @torch.no_grad()
    def compute_scale(self) -> None:
        """Set ``scale`` from the observer (fixed scales never change)."""
        if self.fixed or self.observer is None or int(self.observer.count) == 0:
            return
        self.scale.copy_(scale_from_amax(self.observer.amax(), self.dtype, self.pow2))

    @torch.no_grad()
    def _qat_update(self, x: torch.Tensor, act: str) -> None:
        if float(self.qat_amax) < 0:
            self.qat_amax.fill_(float(self.scale) * self.qmax)
        # (max and min do not depend on the order: reduce in memory order when fast)
        xd = intmath.dense_view(x.detach()) if intmath.fast_train_paths() else x.detach()
        if act != "none":
            amax = xd.max().clamp(0, 6.0 if act == "relu6" else None)
        else:
            lo, hi = torch.aminmax(xd)
            amax = torch.maximum(-lo, hi)
        self._qat_move(amax)

    @torch.no_grad()
    def _qat_move(self, amax: torch.Tensor) -> None:
        c = self.qat_averaging
        self.qat_amax.mul_(1 - c).add_(c * amax.float())
        self.scale.copy_(scale_from_amax(self.qat_amax, self.dtype, self.pow2))

    @torch.no_grad()
    def track_range(self, lo: float, hi: float, act: str = "none") -> None:
        """:meth:`track` given the float64 min and max of the values instead of the values (the
        same update: ``act``'s clamp of the max, or the larger of ``-min`` and ``max``)."""
        if float(self.qat_amax) < 0:
            self.qat_amax.fill_(float(self.scale) * self.qmax)
        t_lo, t_hi = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
        if act != "none":
            amax = t_hi.clamp(0, 6.0 if act == "relu6" else None)
        else:
            amax = torch.maximum(-t_lo, t_hi)
        self._qat_move(amax)

    def tracks(self) -> bool:
        """True when this call should move the QAT range (training, averaging, not frozen)."""
        return (self.mode == "qat" and self.training and not self.fixed and not self.lsq
                and not self.observer_frozen and self.qat_averaging > 0)

    def track(self, x: torch.Tensor, act: str = "none") -> None:
        """QAT: move the range towards ``act(x)``'s (the integer ops call this before they
        requantize with the new scale)."""
        self._qat_update(x, act)

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """Fake-quantize ``x`` (any shape), fusing ``act`` (``relu``: ``quant_min = 0``;
        ``relu6``: also ``quant_max = round(6 / scale)``): the same values and gradients as
        ``fq(act(x))``, one pass instead of two."""
        if self.mode in ("float", "observe"):
            x = apply_act(x, act)
            if self.mode == "observe" and self.observer is not None:
                self.observer(x)
            return x
        relu = act != "none"
        qmin = 0 if relu else self.qmin
        if self.lsq and not self.fixed:
            x = F.relu6(x) if act == "relu6" else x
            grad_factor = 1.0 / (max(x[0].numel(), 1) * self.qmax) ** 0.5
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.reshape(1), self.zero_point.float().reshape(1), qmin, self.qmax,
                grad_factor)
        if self.tracks():
            self._qat_update(x, act)
        qmax = self.qmax
        if act == "relu6":
            qmax = min(qmax, int(round(6.0 / float(self.scale))))
        return fake_quant_tensor(x, self.scale, qmin, qmax)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, scale={float(self.scale):.6g}, pow2={self.pow2}"


class QConv2d(nn.Module):
    """Conv2d (+ BatchNorm) (+ residual add) (+ relu/relu6), fused, then fake-quantized.

    ``forward(x: Tensor[N, C, H, W], res: Tensor[N, O, H', W'] | None) -> Tensor[N, O, H', W']``.
    Eval / frozen BN: BN folded into the weights (``w·γ/σ``, ``β + (b - μ)·γ/σ``), weights fake
    quantized per output channel, the bias on the int32 grid ``s_in·s_w``. QAT with live BN:
    torch.ao's recipe - conv with the folded fake-quant weight divided back by ``γ/σ``, then BN
    with batch statistics (running statistics keep updating until ``freeze_bn``).
    """

    bn_frozen_flag: torch.Tensor

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: str, residual: bool,
                 out_fq: ActFQ | None, pow2: bool = False, exact: bool = False) -> None:
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"unknown activation {act!r}")
        self.conv, self.bn, self.act, self.residual = conv, bn, act, residual
        self.out_fq, self.pow2, self.exact = out_fq, pow2, exact
        self.mode = "float"
        self.register_buffer("bn_frozen_flag", torch.tensor(False))  # persisted: QAT resumes frozen
        # per call site: the quantizers of the input and of the residual (not submodules)
        self.in_fq: list[ActFQ | None] = []
        self.res_fq: list[ActFQ | None] = []
        # the eval cache, per call site: ([(source tensor, copy of its values)], the scales and
        # settings, the integers)
        self._ints: dict[int, tuple[list[Any], tuple[Any, ...], intmath.ConvInts]] = {}

    def hat_set_mode(self, mode: str) -> None:
        self.mode = mode
        self._ints = {}

    @property
    def bn_frozen(self) -> bool:
        """True once QAT froze BN statistics (``freeze_bn_epoch``); saved with the weights."""
        return bool(self.bn_frozen_flag)

    def freeze_bn(self) -> None:
        """Stop updating BN statistics; QAT then trains with BN folded (as deployed)."""
        self.bn_frozen_flag.fill_(True)
        if self.bn is not None:
            self.bn.eval()

    def train(self, mode: bool = True) -> QConv2d:
        super().train(mode)
        self._ints = {}
        if self.bn_frozen and self.bn is not None:
            self.bn.eval()
        return self

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BN folded into (weight Tensor[O, I/g, kh, kw], bias Tensor[O]) with running stats."""
        w = self.conv.weight
        b = self.conv.bias if self.conv.bias is not None else w.new_zeros(w.shape[0])
        if self.bn is None:
            return w, b
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        return w * factor.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * factor

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._ints = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _sources(self) -> list[torch.Tensor | None]:
        """The tensors the folded weight and bias are computed from."""
        conv, bn = self.conv, self.bn
        ts = [conv.weight, conv.bias]
        if bn is not None:
            ts += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return ts

    def cached_ints(self, s_in: float, s_res: float | None, in_dtype: str, site: int = 0
                    ) -> intmath.ConvInts:
        """This conv's integers for no-grad eval (:func:`hat_bpu.quant.intmath.conv_ints`),
        rebuilt unless the tensors they come from (weight, bias, BN parameters and statistics)
        are the same objects with the same values as when they were built, and the scales and
        settings are the same. The values are compared (a copy is kept): in-place updates
        through ``.data`` do not bump a tensor's version counter. Dropped on ``set_mode``,
        ``train()`` and ``load_state_dict``."""
        assert self.out_fq is not None
        s_out, dtype = float(self.out_fq.scale), self.out_fq.dtype
        tensors = self._sources()
        key = (s_in, s_res, in_dtype, s_out, dtype, self.act, self.pow2, self.exact, self.mode,
               None if self.bn is None else self.bn.eps)
        old = self._ints.get(site)
        if (old is None or old[1] != key or len(old[0]) != len(tensors)
                or not all(_same(a, b) for a, b in zip(old[0], tensors, strict=True))):
            w, b = self.folded()
            ints = intmath.conv_ints(w, b, self.conv, s_in, s_res, s_out, self.pow2, in_dtype,
                                     self.exact, dtype, act_clip(self.act, s_out, dtype))
            snap = [None if t is None else (t, t.detach().clone()) for t in tensors]
            self._ints[site] = old = snap, key, ints
        return old[2]

    def input_scale(self, site: int = 0) -> torch.Tensor | None:
        """The scale of this conv's input at call ``site`` (None when unknown)."""
        fq = self.in_fq[site] if site < len(self.in_fq) else None
        return fq.scale.detach() if fq is not None else None

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def _int_inputs(self, res: torch.Tensor | None, site: int
                    ) -> tuple[float, float | None, str] | None:
        """(s_in, s_res, input dtype) when this call runs the integer form: fake quant or QAT
        with BN folded (eval, or frozen), scales known, not LSQ; else None."""
        if self.out_fq is None or self.mode not in ("fake_quant", "qat") or self.out_fq.lsq:
            return None
        if self.bn is not None and self.bn.training:
            return None  # QAT with live BN statistics: torch.ao's float recipe below
        fq = self.in_fq[site] if site < len(self.in_fq) else None
        rq = self.res_fq[site] if site < len(self.res_fq) else None
        if fq is None or (res is not None and rq is None):
            return None
        return float(fq.scale), (float(rq.scale) if res is not None and rq is not None
                                 else None), fq.dtype

    def forward(self, x: torch.Tensor, res: torch.Tensor | None = None,
                site: int = 0) -> torch.Tensor:
        ints = self._int_inputs(res, site)
        if ints is not None and self.out_fq is not None:
            s_in, s_res, in_dtype = ints
            if not self.training and intmath.fast_paths():
                ints_ = self.cached_ints(s_in, s_res, in_dtype, site)
                return intmath.int_conv_fast(x, res, ints_, self.conv, s_in, s_res)
            w, b = self.folded()
            dtype, act = self.out_fq.dtype, self.act
            fused = torch.is_grad_enabled() and intmath.fast_train_paths()
            run = intmath.int_conv_train if fused else intmath.int_conv
            return run(x, res, w, b, self.conv, s_in, s_res, self.out_fq,
                       lambda s_out: act_clip(act, s_out, dtype), self.pow2, in_dtype,
                       self.exact and not self.training, act)
        if self.mode in ("float", "observe") or self.out_fq is None:
            y = self.conv(x)
            if self.bn is not None:
                y = self.bn(y)
        elif self.bn is not None and self.bn.training:
            bn = self.bn
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            factor = gamma / torch.sqrt(bn.running_var + bn.eps)
            f = factor.reshape(-1, 1, 1, 1)
            w, _ = fake_quant_weight(self.conv.weight * f, "int8", self.pow2)
            # conv(x, fq(w·f)) / f == conv(x, fq(w·f) / f): divide the weight, not the output
            y = self._conv(x, w / f, self.conv.bias)
            y = bn(y)
        else:
            w, b = self.folded()
            wq, w_scale = fake_quant_weight(w, "int8", self.pow2)
            s_in = self.input_scale(site)
            if s_in is not None:
                acc_scale = (s_in * w_scale).to(b.dtype)
                bq = torch.clamp(torch.round(b / acc_scale), -(2**31), 2**31 - 1) * acc_scale
                b = b + (bq - b).detach()  # straight-through
            y = self._conv(x, wq, b)
        if res is not None:
            y = y + res
        if self.out_fq is None:
            return apply_act(y, self.act)
        return self.out_fq(y, self.act)


def _same(snap: tuple[torch.Tensor, torch.Tensor] | None, t: torch.Tensor | None) -> bool:
    """``t`` is the tensor of ``snap`` (object, copy) and still holds the copy's values."""
    if snap is None or t is None:
        return snap is None and t is None
    return snap[0] is t and torch.equal(snap[1], t)


def _int_scales(mod: nn.Module, float_out: Any) -> list[float] | None:
    """Input scales when ``mod`` runs its integer form (fake quant / QAT, inputs quantized, not
    LSQ), else None. In QAT the output range first follows ``float_out()`` (a float tensor)."""
    fq: ActFQ = mod.out_fq  # type: ignore[assignment]
    ins: list[ActFQ | None] = getattr(mod, "in_fqs", [])
    if fq.mode not in ("fake_quant", "qat") or fq.lsq or not ins or any(q is None for q in ins):
        return None
    if fq.tracks():
        with torch.no_grad():
            fq.track(float_out(), getattr(mod, "act", "none"))
    return [float(q.scale) for q in ins if q is not None]


def _sum(xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The detached sum of ``xs`` for the QAT range (max/min): the fast paths add in place
    into one new tensor (the plain ``0 + x0 + x1 ...`` differs at most in the sign of a zero,
    which the range update cannot see: it adds ``c·amax`` to a positive ``(1-c)·amax``)."""
    if not intmath.fast_train_paths() or len(xs) < 2:
        return sum(x.detach() for x in xs)  # type: ignore[return-value]
    y = xs[0].detach() + xs[1].detach()
    for x in xs[2:]:
        y.add_(x.detach())
    return y


class QAdd(nn.Module):
    """Elementwise sum of quantized tensors (+ relu), fake-quantized at its own scale, with the
    march's add arithmetic (``march``: :func:`hat_bpu.quant.qspec.add_params`)."""

    def __init__(self, out_fq: ActFQ, act: str = "none", exact: bool = False,
                 march: str | None = None) -> None:
        super().__init__()
        self.out_fq, self.act, self.exact, self.march = out_fq, act, exact, march
        self.in_fqs: list[ActFQ | None] = []

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        scales = _int_scales(self, lambda: _sum(xs))
        if scales is not None:
            s_out, dtype = float(self.out_fq.scale), self.out_fq.dtype
            return intmath.int_sum(list(xs), scales, s_out, dtype,
                                   act_clip(self.act, s_out, dtype), self.march)
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return self.out_fq(y, self.act)


class QCat(nn.Module):
    """Concatenation of quantized tensors along ``dim``, requantized to one scale."""

    def __init__(self, out_fq: ActFQ, dim: int = 1, exact: bool = False) -> None:
        super().__init__()
        self.out_fq, self.dim, self.exact = out_fq, dim, exact
        self.in_fqs: list[ActFQ | None] = []

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        scales = _int_scales(self, lambda: torch.cat([x.detach() for x in xs], self.dim))
        if scales is not None:
            s_out, dtype = float(self.out_fq.scale), self.out_fq.dtype
            return torch.cat([intmath.int_requant(x, si / s_out, si, s_out, dtype, None)
                              for x, si in zip(xs, scales, strict=True)], self.dim)
        return self.out_fq(torch.cat(xs, self.dim))


class QAct(nn.Module):
    """A standalone activation requantized to its own scale (IR ``requantize`` with a clip)."""

    def __init__(self, out_fq: ActFQ, act: str, exact: bool = False) -> None:
        super().__init__()
        self.out_fq, self.act, self.exact = out_fq, act, exact
        self.in_fqs: list[ActFQ | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = _int_scales(self, lambda: x.detach())
        if scales is not None:
            s_out, dtype = float(self.out_fq.scale), self.out_fq.dtype
            return intmath.int_requant(x, scales[0] / s_out, scales[0], s_out, dtype,
                                       act_clip(self.act, s_out, dtype))
        return self.out_fq(x, self.act)


class QScale(nn.Module):
    """A quantized tensor times a constant (a Python number, or a scalar computed from
    parameters, e.g. BiFPN's normalised fusion weights), requantized to its own scale.

    ``forward(x, c=None)``: ``fq(x · c)`` (``fq(x / c)`` when ``divide``); ``c`` defaults to
    ``const``. Integer form: ``requantize`` with ``m / 2**s ≈ c · s_in / s_out``.
    """

    def __init__(self, out_fq: ActFQ, const: float | None = None, divide: bool = False,
                 exact: bool = False) -> None:
        super().__init__()
        self.out_fq, self.const, self.divide, self.exact = out_fq, const, divide, exact
        self.in_fqs: list[ActFQ | None] = []

    def forward(self, x: torch.Tensor, c: torch.Tensor | float | None = None) -> torch.Tensor:
        c = self.const if c is None else c
        assert c is not None
        learned = isinstance(c, torch.Tensor) and c.requires_grad and self.training
        scales = None if learned else _int_scales(
            self, lambda: x.detach() / c if self.divide else x.detach() * c)
        if scales is not None:  # (a learned constant keeps float fake quant while it trains)
            s_in, s_out, cv = scales[0], float(self.out_fq.scale), float(c)
            ratio = s_in / (cv * s_out) if self.divide else cv * s_in / s_out
            return intmath.int_requant(x, ratio, s_in, s_out, self.out_fq.dtype, None)
        return self.out_fq(x / c if self.divide else x * c)
