"""Filter banks whose response histograms describe low-level image characteristics.

Selective joint fine-tuning (Ge & Yu, CVPR 2017, §3.2) describes every image by histograms of
the responses to a filter bank, with two choices of bank:

* a **linear** bank: Gabor filters, "the parameter setting in [Manjunath & Ma 1996] as a
  reference", 4 scales x 6 orientations, real and imaginary parts = 48 filters
  (:func:`gabor_bank`, :func:`gabor_filter_bank`);
* a **non-linear** bank: all kernels of the first (and second) convolutional layer of an
  ImageNet-pretrained CNN *together with their non-linear activation*
  (:func:`source_conv_bank`, :func:`source_filter_bank`).

A :class:`BaseFilterBank` takes RGB images in ``[0, 1]`` (B, 3, H, W) and returns response maps
(B, F, h, w); it does its own preprocessing (greyscale for Gabor, the model's mean/std for a CNN).
``bank.groups`` gives the number of filters of each layer, which eq. (1) uses to weight every
histogram by ``1/N_h``; ``bank.key`` is a stable string (name + hash of all weights) for caches.

Extension point: a :class:`BaseFilterBank` subclass builds itself for a source model
(``from_source``); adding a bank is that class plus one ``FILTER_BANKS.register`` line (at the end
of this module), after which ``create_filter_bank(name)`` and ``retrieval_bank`` accept its name.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import Registry
from ..errors import AutotlError

__all__ = [
    "BaseFilterBank",
    "FILTER_BANKS",
    "create_filter_bank",
    "list_filter_banks",
    "GaborFilterBank",
    "ConvFilterBank",
    "FirstConvActivations",
    "FirstConvsFilterBank",
    "GaborParams",
    "gabor_params",
    "gabor_bank",
    "gabor_filter_bank",
    "source_conv_bank",
    "source_filter_bank",
    "filter_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def filter_weights(groups: Sequence[int]) -> torch.Tensor:
    """Per-filter weights of eq. (1): ``1/N_h`` for each of the ``N_h`` filters of layer ``h``."""
    parts = [torch.full((int(n),), 1.0 / int(n)) for n in groups if int(n) > 0]
    return torch.cat(parts) if parts else torch.zeros(0)


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        t = t.to(torch.float32)
    return str(tuple(t.shape)).encode() + t.numpy().tobytes()


class BaseFilterBank(ABC):
    """A set of (possibly non-linear) spatial filters; see the module docstring.

    Subclasses implement :meth:`from_source`, :meth:`responses` and :meth:`_key_material`, and set
    ``name`` and ``groups`` (filters per layer, in channel order).
    """

    name: str = "filterbank"
    groups: tuple[int, ...] = ()

    @property
    def num_filters(self) -> int:
        return int(sum(self.groups))

    def filter_weights(self) -> torch.Tensor:
        """(F,) weights ``1/N_h`` of eq. (1)."""
        return filter_weights(self.groups)

    @classmethod
    @abstractmethod
    def from_source(cls, source_model: nn.Module | None) -> "BaseFilterBank":
        """The bank retrieval uses with this source model (banks that ignore it accept None)."""

    @abstractmethod
    def responses(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images (B, 3, H, W) in [0, 1] -> responses (B, F, h, w), float32."""

    @abstractmethod
    def _key_material(self) -> list[bytes]:
        """Bytes that identify the filters (their weights and processing) for :attr:`key`."""

    def describe(self) -> str:
        """What the bank is, in words (the model card says it)."""
        return f"{self.name}: {self.num_filters} filters"

    @property
    def key(self) -> str:
        """Stable identifier: ``name@sha256(weights)[:16]``; changes whenever any weight changes."""
        return f"{self.name}@{_digest(self.name.encode(), *self._key_material())[:16]}"

    def to(self, device: str | torch.device) -> "BaseFilterBank":  # pragma: no cover - overridden
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, groups={self.groups}, key={self.key!r})"


# --------------------------------------------------------------------------------------------
# Gabor bank (Manjunath & Ma 1996)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaborParams:
    """One Gabor filter: ``scale`` 0 is the finest; ``theta`` in radians (see :func:`gabor_bank`)."""

    scale: int
    orientation: int
    theta: float
    frequency: float  # centre frequency, cycles / pixel
    wavelength: float  # 1 / frequency, pixels
    sigma_x: float  # envelope std along the carrier direction, pixels
    sigma_y: float  # envelope std across it, pixels


def gabor_params(
    scales: int = 4, orientations: int = 6, *, u_low: float = 0.05, u_high: float = 0.4
) -> list[GaborParams]:
    """The Manjunath & Ma (1996) design: ``scales x orientations`` filters, scale-major order.

    Centre frequencies are spaced geometrically between ``u_high`` and ``u_low`` (cycles/pixel):
    ``f_m = u_high / a**m`` with ``a = (u_high/u_low) ** (1/(S-1))``; orientations
    ``theta_n = n*pi/K``. The bandwidths are chosen so that neighbouring filters' half-peak
    contours touch in frequency (M&M eq. 8-9)::

        sigma_u = (a-1) U_h / ((a+1) sqrt(2 ln 2))
        sigma_v = tan(pi/2K) (U_h - 2 ln2 sigma_u^2/U_h) / sqrt(2 ln2 - (2 ln2)^2 sigma_u^2/U_h^2)
        sigma_x = 1/(2 pi sigma_u),  sigma_y = 1/(2 pi sigma_v)   (scaled by a**m at scale m)

    With the defaults (S=4, K=6, 0.05..0.4): a = 2; frequencies 0.4, 0.2, 0.1, 0.05 cycles/px
    (wavelengths 2.5, 5, 10, 20 px); sigma_x = 1.41, 2.81, 5.62, 11.24 px and
    sigma_y = 1.85, 3.71, 7.42, 14.84 px; orientations 0, 30, ..., 150 degrees.
    """
    if scales < 1 or orientations < 1:
        raise ValueError("scales and orientations must be >= 1")
    if not 0 < u_low <= u_high < 0.5 + 1e-9:
        raise ValueError("need 0 < u_low <= u_high <= 0.5 cycles/pixel")
    a = (u_high / u_low) ** (1.0 / (scales - 1)) if scales > 1 else 2.0
    ln2x2 = 2.0 * math.log(2.0)
    sigma_u = (a - 1.0) * u_high / ((a + 1.0) * math.sqrt(ln2x2))
    sigma_v = (
        math.tan(math.pi / (2 * orientations))
        * (u_high - ln2x2 * sigma_u**2 / u_high)
        / math.sqrt(ln2x2 - ln2x2**2 * sigma_u**2 / u_high**2)
    )
    sx, sy = 1.0 / (2 * math.pi * sigma_u), 1.0 / (2 * math.pi * sigma_v)
    out = []
    for m in range(scales):
        f = u_high / a**m
        for n in range(orientations):
            out.append(GaborParams(m, n, n * math.pi / orientations, f, 1.0 / f, sx * a**m, sy * a**m))
    return out


def _support_radius(p: GaborParams, n_std: float = 3.0) -> int:
    return int(math.ceil(n_std * max(p.sigma_x, p.sigma_y)))


def gabor_bank(
    scales: int = 4,
    orientations: int = 6,
    ksize: int | None = None,
    *,
    u_low: float = 0.05,
    u_high: float = 0.4,
) -> torch.Tensor:
    """Gabor kernels (2*scales*orientations, 1, k, k), float32: real parts, then imaginary parts.

    Channel ``c = part*S*K + scale*K + orientation`` (part 0 = real/even, 1 = imaginary/odd);
    the parameters of each scale/orientation are :func:`gabor_params` (M&M 1996 design; scale 0
    is the finest, 0.4 cycles/px). Kernel (row y, column x, centred)::

        g(x, y) = exp(-x'^2/(2 sx^2) - y'^2/(2 sy^2)) * (exp(2 pi i f x') - kappa)
        x' = x cos(theta) + y sin(theta),  y' = -x sin(theta) + y cos(theta)

    i.e. the carrier oscillates along the direction at angle ``theta`` from the +x (column) axis
    towards +y (row, downwards). Each kernel is supported on the square ``|x|, |y| <= r_m``,
    ``r_m = ceil(3 * max(sx, sy))`` at its own scale (6, 12, 23, 45 px with the defaults; zero
    outside, and never beyond ``ksize//2``). ``kappa`` (Morlet correction) makes every kernel
    exactly zero-mean while keeping it localised, so a flat region responds 0. Each kernel is
    scaled to unit L2 norm (the histogram bins are adaptive per filter, so the scale is only a
    convention). ``ksize`` (odd) defaults to the coarsest support, ``2*r_max+1`` (91 px).
    """
    params = gabor_params(scales, orientations, u_low=u_low, u_high=u_high)
    k = 2 * max(_support_radius(p) for p in params) + 1 if ksize is None else int(ksize)
    if k < 3 or k % 2 == 0:
        raise ValueError(f"ksize must be odd and >= 3, got {ksize}")
    r = k // 2
    yy, xx = torch.meshgrid(
        torch.arange(-r, r + 1, dtype=torch.float64), torch.arange(-r, r + 1, dtype=torch.float64), indexing="ij"
    )
    real, imag = [], []
    for p in params:
        c, s = math.cos(p.theta), math.sin(p.theta)
        xr = xx * c + yy * s
        yr = -xx * s + yy * c
        rm = min(r, _support_radius(p))
        window = ((xx.abs() <= rm) & (yy.abs() <= rm)).to(torch.float64)
        env = torch.exp(-0.5 * (xr**2 / p.sigma_x**2 + yr**2 / p.sigma_y**2)) * window
        carrier = torch.polar(torch.ones_like(xr), 2 * math.pi * p.frequency * xr)
        kappa = (env * carrier).sum() / env.sum()
        g = env * (carrier - kappa)
        for part, dst in ((g.real, real), (g.imag, imag)):
            part = part - window * (part.sum() / window.sum())  # remove the float rounding residue
            dst.append(part / part.norm().clamp_min(1e-12))
    return torch.stack(real + imag).unsqueeze(1).to(torch.float32)


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly length)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < 2 * n:
        p35 = p5
        while p35 < 2 * n:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


class GaborFilterBank(BaseFilterBank):
    """Linear Gabor bank on the greyscale (ITU-R 601 luma) image, computed by FFT.

    Every response is ``F.conv2d(grey, kernels, padding=k//2)`` (cross-correlation, like a conv
    layer) except at the border, where the image is reflection-padded instead of zero-padded (so
    the image border does not look like a strong edge), sampled on a grid of step ``stride``
    (output (B, 48, ceil(H/stride), ceil(W/stride))). Sampling only thins out the pixels that enter
    the histograms; the sampled values are the full-resolution responses.

    Speed (the FFT work is what a pool of thousands of images costs):

    * the real/imaginary pair of each scale/orientation is one complex kernel, so one complex
      inverse FFT yields both the even and the odd response;
    * scales are processed in groups, each padded only by its own support radius;
    * sampling every ``stride``-th pixel == averaging the ``stride**2`` spectral aliases, so the
      inverse FFTs run at 1/stride of the size; for scales whose spectrum lies (to 4 sigma) below
      the output grid's Nyquist frequency only the low-frequency block is used at all. That
      discards spectral tails below ~1e-4 of the peak; every other step is exact.
    """

    def __init__(
        self,
        scales: int = 4,
        orientations: int = 6,
        ksize: int | None = None,
        *,
        stride: int = 2,
        u_low: float = 0.05,
        u_high: float = 0.4,
        max_batch: int = 8,
    ):
        self.scales, self.orientations = int(scales), int(orientations)
        self.params = gabor_params(scales, orientations, u_low=u_low, u_high=u_high)
        self.kernels = gabor_bank(scales, orientations, ksize, u_low=u_low, u_high=u_high)
        self.ksize = int(self.kernels.shape[-1])
        self.stride = int(stride)
        if self.stride < 1:
            raise ValueError("stride must be >= 1")
        self.max_batch = int(max_batch)
        self.name = f"gabor-s{self.scales}-o{self.orientations}-k{self.ksize}-st{self.stride}"
        self.groups = (int(self.kernels.shape[0]),)
        self.device = torch.device("cpu")
        # scale groups: (pad radius, crop?) -> complex filter indices
        plan: dict[tuple[int, bool], list[int]] = {}
        nyq = 0.5 / self.stride
        for j, p in enumerate(self.params):
            band = p.frequency + 4.0 / (2 * math.pi * min(p.sigma_x, p.sigma_y))
            crop = self.stride > 1 and band <= nyq
            plan.setdefault((crop,), []).append(j)
        self._plan = []
        for (crop,), idx in sorted(plan.items()):
            radius = min(self.ksize // 2, max(_support_radius(self.params[j]) for j in idx))
            self._plan.append((crop, radius, idx))
        self._spectra: dict[tuple, torch.Tensor] = {}

    def describe(self) -> str:
        return (f"{self.num_filters} Gabor filters on the greyscale image ({self.scales} scales x {self.orientations} "
                f"orientations, real and imaginary parts; Manjunath & Ma 1996)")

    @classmethod
    def from_source(cls, source_model: nn.Module | None = None) -> "GaborFilterBank":
        """The paper's 48-filter bank (the defaults); a linear bank does not depend on the model."""
        return cls()

    def _key_material(self) -> list[bytes]:
        return [b"gabor-fft-reflect-luma601", str(self.stride).encode(), _tensor_bytes(self.kernels)]

    def to(self, device: str | torch.device) -> "GaborFilterBank":
        self.device = torch.device(device)
        return self

    @staticmethod
    def _low_index(m: int, n: int, device) -> torch.Tensor:
        """Indices (in an n-point FFT) of the m lowest frequencies, in m-point FFT order."""
        k = torch.arange(m, device=device)
        return torch.where(k < (m + 1) // 2, k, k + n - m)

    @staticmethod
    def _low_block(X: torch.Tensor, mh: int, mw: int) -> torch.Tensor:
        """X[..., low rows, low cols] (see :meth:`_low_index`) with slices instead of a gather."""
        ah, aw = (mh + 1) // 2, (mw + 1) // 2
        X = torch.cat([X[..., :ah, :], X[..., X.shape[-2] - (mh - ah) :, :]], dim=-2)
        return torch.cat([X[..., :aw], X[..., X.shape[-1] - (mw - aw) :]], dim=-1)

    def _spectrum(self, gi: int, nh: int, nw: int) -> torch.Tensor:
        key = (gi, nh, nw, str(self.device))
        spec = self._spectra.get(key)
        if spec is None:
            crop, radius, idx = self._plan[gi]
            half, c0, k = self.kernels.shape[0] // 2, self.ksize // 2, 2 * radius + 1
            sl = slice(c0 - radius, c0 + radius + 1)
            ker = self.kernels[:, 0, sl, sl]
            c = torch.complex(ker[idx], ker[[half + j for j in idx]]).to(self.device)
            padded = torch.zeros(len(idx), nh, nw, dtype=torch.complex64, device=self.device)
            padded[:, :k, :k] = c
            # cross-correlation with c == convolution with c(-u): spectrum conj(FFT(conj(c)))
            spec = torch.fft.fft2(padded.conj()).conj()
            s = self.stride
            mh, mw = nh // s, nw // s
            if crop:  # only the low-frequency block survives (mean over s*s aliases -> 1/s^2)
                ih, iw = self._low_index(mh, nh, spec.device), self._low_index(mw, nw, spec.device)
                spec = spec[:, ih][:, :, iw] / (s * s)
            elif s > 1:  # (s, s, G, mh, mw): one block per alias, pre-divided by s^2
                spec = spec.view(len(idx), s, mh, s, mw).permute(1, 3, 0, 2, 4) / (s * s)
            spec = spec.contiguous()
            if len(self._spectra) > 16:
                self._spectra.clear()
            self._spectra[key] = spec
        return spec

    @torch.no_grad()
    def responses(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        B, _, H, W = x.shape
        s, half = self.stride, self.kernels.shape[0] // 2
        oh, ow = -(-H // s), -(-W // s)
        out = torch.empty(B, 2 * half, oh, ow, dtype=torch.float32, device=x.device)
        # one padding mode for all groups (decided by the largest kernel), so every group sees
        # the same padded image as a single full-size convolution would
        mode = "reflect" if self.ksize // 2 < min(H, W) else "replicate"
        for gi, (crop, p, idx) in enumerate(self._plan):
            xp = F.pad(x, (p, p, p, p), mode=mode)[:, 0] if p > 0 else x[:, 0]
            mh, mw = _fast_len(-(-(H + 2 * p) // s)), _fast_len(-(-(W + 2 * p) // s))
            nh, nw = mh * s, mw * s  # FFT size: fast, and a multiple of the stride
            spec = self._spectrum(gi, nh, nw)
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            real_idx = torch.tensor(idx, device=x.device)
            for i in range(0, B, self.max_batch):  # bounded memory: (b, G, nh/s, nw/s) complex
                X = torch.fft.fft2(xp[i : i + self.max_batch], s=(nh, nw))
                b = X.shape[0]
                if crop:
                    Y = self._low_block(X, mh, mw).unsqueeze(1) * spec.unsqueeze(0)
                elif s > 1:
                    Xb = X.view(b, s, mh, s, mw)
                    Y = None
                    for a1 in range(s):
                        for a2 in range(s):
                            term = Xb[:, a1, :, a2, :].unsqueeze(1) * spec[a1, a2].unsqueeze(0)
                            Y = term if Y is None else Y.add_(term)
                else:
                    Y = X.unsqueeze(1) * spec.unsqueeze(0)
                y = torch.fft.ifft2(Y)[:, :, :oh, :ow]
                if contiguous:
                    j0, j1 = idx[0], idx[0] + len(idx)
                    out[i : i + b, j0:j1] = y.real
                    out[i : i + b, half + j0 : half + j1] = y.imag
                else:
                    out[i : i + b].index_copy_(1, real_idx, y.real.contiguous())
                    out[i : i + b].index_copy_(1, real_idx + half, y.imag.contiguous())
        return out


def gabor_filter_bank(
    scales: int = 4, orientations: int = 6, ksize: int | None = None, *, stride: int = 2, **kw
) -> GaborFilterBank:
    """The paper's Gabor bank as a :class:`BaseFilterBank` (48 filters with the defaults)."""
    return GaborFilterBank(scales, orientations, ksize, stride=stride, **kw)


# --------------------------------------------------------------------------------------------
# Non-linear bank: the first convolutional stage(s) of a pretrained timm model
# --------------------------------------------------------------------------------------------


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)):
        return True
    name = type(m).__name__.lower()
    return "norm" in name and not isinstance(m, (nn.Conv2d, nn.Linear))


def _is_act(m: nn.Module) -> bool:
    mod = type(m).__module__
    if mod.startswith("torch.nn.modules.activation"):
        return True
    if "activations" in mod and not list(m.children()):  # timm.layers.activations*
        return True
    return type(m).__name__ in {"Swish", "SiLU", "HardSwish", "Mish", "GELU", "GELUTanh", "QuickGELU"}


def _layer_with_followers(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` plus the norm / activation siblings that directly follow it."""
    try:
        first = model.get_submodule(path)
    except AttributeError as e:
        raise AutotlError(f"model has no module {path!r} (pretrained_cfg['first_conv']); pass a supported model") from e
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    mods = [first]
    names = list(parent._modules)
    for name in names[names.index(leaf) + 1 :]:
        m = parent._modules[name]
        if m is None or isinstance(m, nn.Identity):
            continue
        if _is_norm(m) or _is_act(m):
            mods.append(m)
        else:
            break
    return nn.Sequential(*mods)


def _out_channels(stage: nn.Module) -> int:
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise AutotlError("the selected stage has no Conv2d; pick a CNN source model")
    return int(convs[-1].out_channels)


class SourceConvStages(nn.Module):
    """The first ``len(stages)`` convolutional stages of a model (frozen, eval mode).

    ``forward(x)`` takes *normalised* images (as the model itself would) and returns the
    concatenated stage outputs (B, sum(groups), h, w); outputs with a larger spatial size than the
    last stage are subsampled (nearest) to it. :meth:`forward_stages` returns them separately.
    """

    def __init__(self, stages: Sequence[nn.Module], groups: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.groups = tuple(int(g) for g in groups)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "SourceConvStages":  # always eval: BN uses running stats
        return super().train(False)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.forward_stages(x)
        h, w = outs[-1].shape[-2:]
        outs = [o if o.shape[-2:] == (h, w) else F.interpolate(o, size=(h, w), mode="nearest") for o in outs]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def source_conv_bank(model: nn.Module, stages: int = 1) -> SourceConvStages:
    """The first (``stages=1``) or first two (``stages=2``) conv stages of a timm model, with their
    non-linearity, as a frozen eval-mode copy (the model itself is not modified).

    * EfficientNet / MobileNet family (``conv_stem`` + ``bn1``; timm's ``bn1`` is a
      ``BatchNormAct2d`` carrying the activation): stage 1 = conv_stem+bn1(+act);
      stage 2 = ``blocks[0]`` (the first block stage, which contains its own activations).
    * ResNet family (``conv1``, ``bn1``, ``act1``; ``conv1`` may be a deep stem): stage 1 only.
    * Anything else: the module named by ``model.pretrained_cfg["first_conv"]`` followed by the
      norm / activation modules that directly follow it in its parent (stage 1 only).
    """
    if stages not in (1, 2):
        raise ValueError("stages must be 1 or 2")
    if hasattr(model, "conv_stem") and hasattr(model, "bn1"):
        mods = [nn.Sequential(model.conv_stem, model.bn1)]
        if stages == 2:
            if not hasattr(model, "blocks") or len(model.blocks) == 0:
                raise AutotlError(f"{type(model).__name__} has no blocks[0]; use stages=1")
            mods.append(model.blocks[0])
    elif all(hasattr(model, a) for a in ("conv1", "bn1", "act1")):
        if stages == 2:
            raise AutotlError("stages=2 is only supported for EfficientNet/MobileNet-style models; use stages=1")
        mods = [nn.Sequential(model.conv1, model.bn1, model.act1)]
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        first = cfg.get("first_conv")
        if not first or stages == 2:
            raise AutotlError(
                f"cannot find the first conv stage of {type(model).__name__} "
                "(no pretrained_cfg['first_conv'], or stages=2 requested); use an EfficientNet or ResNet source model"
            )
        if isinstance(first, (list, tuple)):
            first = first[0]
        mods = [_layer_with_followers(model, first)]
    mods = [copy.deepcopy(m) for m in mods]
    groups = [_out_channels(m) for m in mods]
    return SourceConvStages(mods, groups)


class ConvFilterBank(BaseFilterBank):
    """Non-linear bank: ``module`` (e.g. :func:`source_conv_bank`) applied to images normalised
    with ``mean``/``std``; ``groups`` filters per layer (weights 1/N_h in eq. 1)."""

    def __init__(
        self,
        module: nn.Module,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        groups: Sequence[int] | None = None,
        name: str = "conv",
    ):
        self.module = module.eval().requires_grad_(False)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        g = groups if groups is not None else getattr(module, "groups", None)
        if g is None:
            raise ValueError("groups (filters per layer) is required for a plain module")
        self.groups = tuple(int(v) for v in g)
        self.name = name
        self.device = torch.device("cpu")

    def describe(self) -> str:
        stages = list(getattr(self.module, "stages", []))
        what = ("the source network's stem (conv + BN + activation) and the output of its first block stage "
                "(blocks[0], which ends in a linear projection)" if len(stages) == 2
                else "the output of the source network's first conv stage with its activation")
        return f"{what}; {'+'.join(map(str, self.groups))} filters ({self.name})"

    @classmethod
    def from_source(cls, source_model: nn.Module | None) -> "ConvFilterBank":
        """The source model's first two conv stages with their activations; the first stage only
        where two are not supported (see :func:`source_conv_bank`)."""
        if source_model is None:
            raise AutotlError("retrieval_bank 'conv' needs the source model")
        try:
            return source_filter_bank(source_model, stages=2)
        except AutotlError:
            return source_filter_bank(source_model, stages=1)

    def _key_material(self) -> list[bytes]:
        chunks = [repr(self.module).encode(), repr((self.mean, self.std, self.groups)).encode()]
        for k, v in sorted(self.module.state_dict().items()):
            chunks += [k.encode(), _tensor_bytes(v)]
        return chunks

    def to(self, device: str | torch.device) -> "ConvFilterBank":
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    @torch.no_grad()
    def responses(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        out = self.module((x - mean) / std)
        if out.shape[1] != self.num_filters:
            raise ValueError(f"module returned {out.shape[1]} channels, groups say {self.num_filters}")
        return out.float()


class _EnoughResponses(Exception):
    """Raised from a forward hook once the bank has its responses: the rest of the net is not run."""


class FirstConvActivations(nn.Module):
    """The responses of the first ``layers`` convolutions of a CNN that are followed by a
    non-linearity, each taken *after* its activation (Ge & Yu's best bank: all kernels of
    AlexNet's conv1 and conv2 with their ReLUs).

    Found by running the (frozen, eval-mode) copy of the model: every activation module's output
    counts when a ``Conv2d`` ran since the previous counted one and the map is larger than 1 x 1
    (so a squeeze-excitation's activation on pooled features is not a layer); the forward pass
    stops once ``layers`` are collected. For EfficientNet-Lite that is conv_stem + BN + ReLU6
    (32 filters) and the first depthwise 3x3 conv + BN + ReLU6 of ``blocks[0]`` (32 filters) —
    not ``blocks[0]``'s output, which its linear 1x1 projection ends; for a ResNet the first two
    conv + BN + ReLU of the stem. ``forward`` returns them concatenated (B, sum(groups), h, w),
    larger maps subsampled (nearest) to the last one's size; ``layer_names`` says which modules.
    """

    def __init__(self, model: nn.Module, layers: int = 2, *, probe_size: int = 64):
        super().__init__()
        if int(layers) < 1:
            raise ValueError("layers must be >= 1")
        self.layers = int(layers)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._outs: list[torch.Tensor] = []
        self._names: list[str] = []
        self._conv_ran = False
        self._used: set[str] = set()
        self._handles = []
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Conv2d):
                self._handles.append(m.register_forward_hook(self._on_conv))
            elif _is_act(m):
                self._handles.append(m.register_forward_hook(functools.partial(self._on_act, name)))
            if not list(m.children()):
                self._handles.append(m.register_forward_hook(functools.partial(self._on_leaf, name)))
        with torch.no_grad():
            outs = self.forward_layers(torch.zeros(1, 3, probe_size, probe_size))
        if len(outs) < self.layers:
            raise AutotlError(f"{type(model).__name__} has only {len(outs)} convolution(s) followed by an activation "
                              f"before its end; the first-convolutions bank needs {self.layers}: pick a CNN source model")
        self.groups = tuple(int(o.shape[1]) for o in outs)
        self.layer_names = tuple(self._names)
        self.used_modules = tuple(sorted(self._used))  # what the responses depend on (the bank's key)

    def train(self, mode: bool = True) -> "FirstConvActivations":  # always eval: BN uses running stats
        return super().train(False)

    def _on_leaf(self, name: str, module, args, output) -> None:
        self._used.add(name)

    def _on_conv(self, module, args, output) -> None:
        self._conv_ran = True

    def _on_act(self, name: str, module, args, output) -> None:
        if not (self._conv_ran and isinstance(output, torch.Tensor) and output.ndim == 4
                and output.shape[-1] * output.shape[-2] > 1):
            return
        self._outs.append(output.clone())  # activations may be in place: later layers must not change it
        self._names.append(name)
        self._conv_ran = False
        if len(self._outs) >= self.layers:
            raise _EnoughResponses

    def forward_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._outs, self._names, self._conv_ran = [], [], False
        try:
            self.model(x)
        except _EnoughResponses:
            pass
        outs, self._outs = self._outs, []
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.forward_layers(x)
        h, w = outs[-1].shape[-2:]
        outs = [o if o.shape[-2:] == (h, w) else F.interpolate(o, size=(h, w), mode="nearest") for o in outs]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


class FirstConvsFilterBank(ConvFilterBank):
    """The paper's best non-linear bank (its Table 1: AlexNet conv1-conv2): the source network's
    first two convolutions that are followed by a non-linearity, responses after the activation
    (:class:`FirstConvActivations`), the model's own mean/std; eq. (1) weights each layer 1/N_h."""

    LAYERS = 2

    def __init__(self, model: nn.Module, layers: int = LAYERS):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        arch = cfg.get("architecture") or type(model).__name__
        module = FirstConvActivations(model, layers)
        super().__init__(module, mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
                         name=f"firstconvs-{arch}-{layers}")

    @classmethod
    def from_source(cls, source_model: nn.Module | None) -> "FirstConvsFilterBank":
        if source_model is None:
            raise AutotlError("retrieval_bank 'firstconvs' needs the source model")
        return cls(source_model)

    def describe(self) -> str:
        return (f"responses after the activation of the source network's first {len(self.groups)} convolutions "
                f"followed by a non-linearity ({', '.join(self.module.layer_names)}; {'+'.join(map(str, self.groups))} filters)")

    def _key_material(self) -> list[bytes]:
        if getattr(self, "_key_cache", None) is None:
            m = self.module
            state = m.model.state_dict()
            used = [k for k in sorted(state) if k.rpartition(".")[0] in set(m.used_modules)]
            chunks = [b"first-conv-activations", repr((m.layer_names, self.mean, self.std, self.groups)).encode()]
            chunks += [repr(m.model.get_submodule(n)).encode() for n in m.used_modules]
            for k in used:
                chunks += [k.encode(), _tensor_bytes(state[k])]
            self._key_cache = chunks
        return self._key_cache


def source_filter_bank(model: nn.Module, stages: int = 1) -> ConvFilterBank:
    """:func:`source_conv_bank` wrapped as a :class:`BaseFilterBank` using the model's own mean/std."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    mod = source_conv_bank(model, stages)
    return ConvFilterBank(
        mod,
        mean=cfg.get("mean", IMAGENET_MEAN),
        std=cfg.get("std", IMAGENET_STD),
        name=f"conv-{arch}-stages{stages}",
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# One line per bank. The order is the order of the banks' histograms in a combined descriptor
# ("gabor+conv") and of their listing.
FILTER_BANKS: Registry[BaseFilterBank] = Registry("filter bank", BaseFilterBank)
FILTER_BANKS.register("gabor", "autotl.retrieval.filterbanks:GaborFilterBank", order=10)
FILTER_BANKS.register("conv", "autotl.retrieval.filterbanks:ConvFilterBank", order=20)
FILTER_BANKS.register("firstconvs", "autotl.retrieval.filterbanks:FirstConvsFilterBank", order=30)


def list_filter_banks() -> list[str]:
    """Registered filter bank names, in registry order."""
    return FILTER_BANKS.names()


def create_filter_bank(name: str, source_model: nn.Module | None = None) -> BaseFilterBank:
    """The bank registered as ``name`` for ``source_model``; an unknown name raises
    ``UnknownNameError`` (a ValueError) listing the known ones."""
    return FILTER_BANKS.get_class(name).from_source(source_model)
