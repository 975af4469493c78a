"""Amortized posterior of the galaxy at the centre of a cutout of a blended scene.

One forward pass of :class:`AmortizedEncoder` per detected source gives a diagonal Gaussian
``q`` over

* ``z`` - the latent morphology vector of a learned prior (:func:`probdeblend.load_prior`),
* ``log_flux`` - the natural log of the total flux per band, in the scene's flux units,
* ``offset`` - the sub-pixel position ``(dx, dy)`` of the galaxy relative to the cutout centre.

This is the "second encoder trained on blends with the decoder frozen" of Arcelin et al. (2021),
trained here with *supervised* targets taken from the frozen prior (see :class:`TrainingSet`).
Users call :meth:`AmortizedPosterior.predict` on a :class:`~probdeblend.Scene`; refinement
(importance reweighting with the scene likelihood, SVI, NUTS) starts from its output. See
``docs/amortized.md``.

Conventions
-----------
Cutouts
    ``stamp_size x stamp_size`` windows of the scene whose centre, pixel coordinate
    ``c = (n - 1) / 2`` of the cutout, is as close as possible to the given position: the window
    starts at ``i0 = floor(x - c + 0.5)`` (same in y), so ``|x - (i0 + c)| <= 0.5``. Parts of the
    window outside the image are zero with weight 0. Pixel coordinates are those of
    :class:`~probdeblend.Scene` (0-based, pixel centres on integers).
Offsets
    ``(dx, dy)`` in scene pixels from the cutout centre: the galaxy's centre in the scene is
    ``cutout_centre + offset``.
Input normalisation
    :func:`cutout_input` (units-free, works at any survey depth and in any flux unit).
Dihedral augmentation
    The 8 symmetries of the square (:func:`dihedral`, :data:`DIHEDRAL_MATRICES`); transforming
    a cutout by ``g`` moves an offset ``o`` to ``DIHEDRAL_MATRICES[g] @ o``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DatasetError, PositionError, PriorLoadError, UnknownBandError
from .priors.frame import ModelFrame

__all__ = [
    "AMORTIZED_CHANNELS",
    "ASINH_SOFTENING",
    "DIHEDRAL_MATRICES",
    "AmortizedEncoder",
    "AmortizedPosterior",
    "AmortizedTrainConfig",
    "TrainingSet",
    "band_features",
    "centroid_features",
    "build_amortized",
    "cutout_input",
    "dihedral",
    "evaluate_amortized",
    "list_amortized",
    "load_amortized",
    "measure_throughput",
    "noise_sigma",
    "psf_fwhm_pixels",
    "save_amortized",
    "split_scenes",
    "train_amortized",
    "windowed_centroid",
]

#: Default channel widths of the convolutional stack.
AMORTIZED_CHANNELS: tuple[int, ...] = (32, 64, 128, 128)
#: ``x / sigma`` is divided by this before the asinh (see :func:`cutout_input`).
ASINH_SOFTENING = 3.0
#: Soft bounds of the predicted log standard deviations (scales in ``[9e-4, 20]``).
LOG_SCALE_BOUNDS = (-7.0, 3.0)
#: Card ``kind`` of amortized models.
KIND = "amortized"
#: Suffix of the shipped amortized model of a prior: ``<prior-name>-amortized``.
SUFFIX = "-amortized"
_FORMAT_VERSION = 1
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548
_LOG_2PI = math.log(2.0 * math.pi)
_MIN_FWHM_PX = _FWHM_PER_SIGMA * math.sqrt(1.0 / 12.0)  # 0.68 px
_REQUIRED_CARD_KEYS = ("name", "kind", "architecture", "frame", "prior", "sha256")


# ----------------------------------------------------------------------------------------------
# Geometry: dihedral group, cutouts
# ----------------------------------------------------------------------------------------------
def dihedral(a, g: int):
    """Apply element ``g`` (0-7) of the dihedral group of the square to ``a`` (``(..., y, x)``).

    ``g = 4 * flip + k``: an optional flip of the x axis followed by ``k`` quarter turns
    (``numpy.rot90`` / ``torch.rot90`` over the last two axes). Works on numpy arrays (returns a
    view) and torch tensors. The pixel centre ``((n - 1) / 2, (n - 1) / 2)`` of a square stamp is
    fixed, so offsets from it transform with :data:`DIHEDRAL_MATRICES`.
    """
    flip, k = divmod(int(g), 4)
    if not 0 <= flip <= 1:
        raise ValueError(f"g must be an integer in 0..7, got {g}")
    if isinstance(a, torch.Tensor):
        if flip:
            a = torch.flip(a, dims=(-1,))
        return torch.rot90(a, k, dims=(-2, -1)) if k else a
    if flip:
        a = a[..., ::-1]
    return np.rot90(a, k, axes=(-2, -1)) if k else a


def _dihedral_matrices() -> np.ndarray:
    # Derived from the array operations themselves so the two can never disagree: after the
    # transform, pixel (x', y') holds what was at (x, y) = A (x', y'); hence (x', y') = A^T (x, y).
    n, c = 5, 2.0
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    out = np.empty((8, 2, 2))
    for g in range(8):
        tx, ty = dihedral(xx - c, g), dihedral(yy - c, g)
        a = np.array([[tx[2, 3], tx[3, 2]], [ty[2, 3], ty[3, 2]]])
        out[g] = a.T
    return out


#: ``(8, 2, 2)`` matrices ``M[g]``: an offset ``(dx, dy)`` becomes ``M[g] @ (dx, dy)`` when the
#: cutout is transformed by :func:`dihedral` ``(., g)``.
DIHEDRAL_MATRICES: np.ndarray = _dihedral_matrices()


def psf_fwhm_pixels(psf) -> np.ndarray:
    """Second-moment FWHM, in pixels, of PSF images ``(..., k, k)``.

    ``2.3548 * sqrt((Qxx + Qyy) / 2)`` with the unweighted central second moments of the PSF
    (negative pixels clipped to 0). Exact for a Gaussian; the wings of a Kolmogorov / Moffat PSF
    make it larger than the half-maximum width. It is an input feature of the encoder, so it
    only needs to be computed the same way at training and inference time. Floored at the
    FWHM of the pixel response, ``2.3548 / sqrt(12) = 0.68`` px (e.g. for a delta-function PSF).
    """
    p = np.clip(np.asarray(psf, dtype=np.float64), 0.0, None)
    k = p.shape[-1]
    if p.ndim < 2 or p.shape[-2] != k:
        raise ValueError(f"psf must be square images (..., k, k), got shape {p.shape}")
    s = p.sum(axis=(-2, -1), keepdims=True)
    if np.any(s <= 0):
        raise ValueError("every PSF image must have a positive sum")
    p = p / s
    ax = np.arange(k, dtype=np.float64)
    mx = (p.sum(-2) * ax).sum(-1)
    my = (p.sum(-1) * ax).sum(-1)
    qxx = (p.sum(-2) * (ax - mx[..., None]) ** 2).sum(-1)
    qyy = (p.sum(-1) * (ax - my[..., None]) ** 2).sum(-1)
    # floor: the width of the pixel response itself (a box has variance 1/12 px^2), so that a
    # delta-function PSF image gives a finite log-FWHM feature
    return np.maximum(_FWHM_PER_SIGMA * np.sqrt(0.5 * (qxx + qyy)), _MIN_FWHM_PX)


def noise_sigma(variance, valid=None) -> np.ndarray:
    """Per-band noise level of cutouts: ``sqrt(median variance)`` over valid pixels.

    ``variance`` is ``(..., band, y, x)``; pixels with infinite or non-positive variance, or
    ``valid == 0``, are ignored. A band with no valid pixel gives NaN (callers replace it).
    """
    v = np.array(variance, dtype=np.float64, copy=True)
    bad = ~np.isfinite(v) | (v <= 0)
    if valid is not None:
        bad |= np.broadcast_to(np.asarray(valid) <= 0, v.shape)
    v[bad] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        return np.sqrt(np.nanmedian(v, axis=(-2, -1)))


def cutout_input(images, sigmas, valid=None, softening: float = ASINH_SOFTENING) -> torch.Tensor:
    """The units-free input of :class:`AmortizedEncoder`.

    Parameters
    ----------
    images : array ``(N, band, n, n)``
        Cutouts in any flux unit; masked / padded pixels hold 0.
    sigmas : array ``(N, band)``
        Per-band noise level of each cutout, in the images' unit (:func:`noise_sigma`).
    valid : array ``(N, band or 1, n, n)``, optional
        1 where a pixel carries data, 0 where it is masked or outside the scene (default all 1).
    softening : float

    Returns
    -------
    Tensor ``(N, band + 1, n, n)``: bands ``asinh(image_b / sigma_b / softening) * valid_b``
    (linear up to a few sigma, logarithmic for bright cores), then one coverage plane, the
    fraction of bands in which the pixel is valid. Multiplying the images and sigmas by the same
    constant leaves the input unchanged, which makes the encoder scale-equivariant.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    if x.ndim != 4 or s.shape != x.shape[:2]:
        raise ValueError(
            f"images must be (N, band, n, n) and sigmas (N, band); got {tuple(x.shape)} and "
            f"{tuple(s.shape)}"
        )
    y = x * (1.0 / (s * softening))[..., None, None]
    # asinh(y) = sign(y) log(|y| + sqrt(y^2 + 1)), written with in-place ops (inputs need no
    # gradient): ~1.8x faster than torch.asinh on CPU, agrees to 1e-6.
    a = y.abs()
    x = torch.copysign(torch.addcmul(torch.ones_like(a), a, a).sqrt_().add_(a).log_(), y)
    if valid is None:
        cov = torch.ones_like(x[:, :1])
    else:
        v = torch.as_tensor(valid, dtype=torch.float32)
        x = x * v
        cov = v.mean(dim=1, keepdim=True).expand(x.shape[0], 1, *x.shape[-2:])
    return torch.cat([x, cov], dim=1)


def band_features(sigmas, psf_fwhm) -> torch.Tensor:
    """Per-band features fed to the encoder head, ``(N, 2 * band)``.

    ``log(sigma_b) - mean_b log(sigma_b)`` (the relative depth of the bands; the absolute noise
    level carries the arbitrary flux unit, so it is left out to keep the encoder
    scale-equivariant) and ``log(psf_fwhm_b)`` (FWHM in pixels, :func:`psf_fwhm_pixels`).
    """
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    f = torch.as_tensor(psf_fwhm, dtype=torch.float32)
    f = f.expand(s.shape) if f.shape != s.shape else f
    ls = torch.log(s)
    return torch.cat([ls - ls.mean(-1, keepdim=True), torch.log(f)], dim=-1)


#: Gaussian window widths (sigma, pixels) and iterations of the :func:`centroid_features`.
CENTROID_WINDOWS: tuple[tuple[float, int], ...] = ((1.5, 3), (3.0, 1))


def windowed_centroid(det: torch.Tensor, sigma_w: float, iters: int = 3) -> torch.Tensor:
    """Gaussian-windowed centroid ``(N, 2)`` of non-negative images ``det (N, n, n)``.

    Offsets ``(dx, dy)`` in pixels from the stamp centre ``(n - 1) / 2``. The window (standard
    deviation ``sigma_w`` pixels) starts on the centre and moves ``iters`` times with
    SExtractor's ``XWIN`` update ``p <- p + 2 (c_w(p) - p)``, where ``c_w(p)`` is the centroid
    weighted by the window at ``p``: exact in one step for a Gaussian source of width
    ``sigma_w``, converging for any width. An image without signal gives 0.
    """
    n = det.shape[-1]
    ax = torch.arange(n, dtype=det.dtype) - (n - 1) / 2.0
    pos = torch.zeros(det.shape[0], 2, dtype=det.dtype)
    for _ in range(int(iters)):
        wx = torch.exp(-0.5 * ((ax[None, :] - pos[:, :1]) / sigma_w) ** 2)  # (N, n)
        wy = torch.exp(-0.5 * ((ax[None, :] - pos[:, 1:]) / sigma_w) ** 2)
        col = torch.einsum("nyx,nx->ny", det, wx)  # x-windowed profile along y
        colx = torch.einsum("nyx,nx->ny", det, wx * ax)
        m = (col * wy).sum(-1) + 1e-3
        c = torch.stack([(colx * wy).sum(-1) / m, (col * wy * ax).sum(-1) / m], -1)
        pos = (2.0 * c - pos).clamp(-n / 2.0, n / 2.0)
    return pos


def centroid_features(images, sigmas, valid=None) -> torch.Tensor:
    """Windowed centroids of the cutouts' detection image, ``(N, 2 * len(CENTROID_WINDOWS))``.

    The detection image is ``max(0, sum_b valid_b * image_b / sigma_b)`` (summed S/N maps,
    units-free); its :func:`windowed_centroid` for each ``(sigma_w, iters)`` of
    :data:`CENTROID_WINDOWS`. The first one is the starting point of the predicted offset (the
    network learns the correction, e.g. for neighbours pulling the centroid); all of them are
    inputs of the head. They move with the cutout under rotations / flips, like offsets.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    y = x / s[..., None, None]
    if valid is not None:
        y = y * torch.as_tensor(valid, dtype=torch.float32)
    det = y.sum(1).clamp_min(0.0)
    return torch.cat([windowed_centroid(det, w, it) for w, it in CENTROID_WINDOWS], dim=-1)


def _soft_clamp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + F.softplus(t - lo) - F.softplus(t - hi)


def _out_size(size: int, n_stride2: int) -> int:
    for _ in range(n_stride2):
        size = (size - 1) // 2 + 1
    return size


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------
class AmortizedEncoder(nn.Module):
    """Cutout of a blend -> diagonal Gaussian over (latent, log-flux per band, offset).

    Architecture: ``Conv3x3(stride 1) -> SiLU`` from ``band + 1`` input planes
    (:func:`cutout_input`) to ``channels[0]``, then ``Conv3x3(stride 2) -> SiLU`` for each width
    in ``channels`` (as :class:`probdeblend.priors.Encoder`), flatten, concatenate the per-band
    features (:func:`band_features`) and the windowed centroids (:func:`centroid_features`),
    then one MLP head per target group (``Linear -> SiLU -> Linear -> SiLU`` of width
    ``hidden`` and a linear output layer giving location and log-scale).

    Outputs (:meth:`forward`), each a tensor with a leading batch axis:
    ``z_loc``, ``z_log_scale`` ``(N, D)``; ``log_flux_loc``, ``log_flux_log_scale`` ``(N, B)``;
    ``offset_loc``, ``offset_log_scale`` ``(N, 2)``. The flux head predicts
    ``log(flux_b / sigma_b)``, to which ``log(sigma_b)`` is added, so the flux scales with the
    image (scale equivariance). Log scales are softly bounded to :data:`LOG_SCALE_BOUNDS`.
    """

    def __init__(
        self,
        n_bands: int,
        stamp_size: int,
        latent_dim: int,
        channels: tuple[int, ...] = AMORTIZED_CHANNELS,
        hidden: int = 256,
        softening: float = ASINH_SOFTENING,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("channels must hold at least one width")
        if int(n_bands) < 1 or int(latent_dim) < 1 or int(stamp_size) < 8:
            raise ValueError(
                f"need n_bands >= 1, latent_dim >= 1 and stamp_size >= 8, got {n_bands}, "
                f"{latent_dim}, {stamp_size}"
            )
        self.n_bands, self.stamp_size = int(n_bands), int(stamp_size)
        self.latent_dim, self.hidden = int(latent_dim), int(hidden)
        self.channels, self.softening = channels, float(softening)
        # in-place SiLU: same values and gradients, ~1.5x faster inference on CPU
        layers: list[nn.Module] = [
            nn.Conv2d(n_bands + 1, channels[0], 3, padding=1),
            nn.SiLU(inplace=True),
        ]
        c_in = channels[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU(inplace=True)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        s = _out_size(self.stamp_size, len(channels))
        n_in = c_in * s * s + 2 * self.n_bands + self.n_centroid
        # one MLP head per target group, so that the many latent dimensions do not drown the
        # gradients of the two offset outputs (observed: a shared head never learned offsets)
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Linear(n_in, self.hidden),
                    nn.SiLU(),
                    nn.Linear(self.hidden, self.hidden),
                    nn.SiLU(),
                    nn.Linear(self.hidden, 2 * width),
                )
                for name, width in self.groups.items()
            }
        )

    @property
    def groups(self) -> dict[str, int]:
        """Output groups and their dimensions: ``z`` (D), ``log_flux`` (B), ``offset`` (2)."""
        return {"z": self.latent_dim, "log_flux": self.n_bands, "offset": 2}

    #: Number of :func:`centroid_features`.
    n_centroid = 2 * len(CENTROID_WINDOWS)

    def config(self) -> dict:
        return {
            "n_bands": self.n_bands,
            "stamp_size": self.stamp_size,
            "latent_dim": self.latent_dim,
            "channels": list(self.channels),
            "hidden": self.hidden,
            "softening": self.softening,
        }

    def forward_raw(
        self, x: torch.Tensor, feats: torch.Tensor, centroids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Outputs from ``x = cutout_input(...)``, ``feats = band_features(...)`` and
        ``centroids = centroid_features(...)``.

        The flux location is the *relative* ``log(flux_b / sigma_b)`` (key ``log_flux_rel``);
        the offset location is the first windowed centroid plus the head's correction.
        """
        h = self.convs(x).flatten(1)
        h = torch.cat([h, feats, centroids], dim=1)
        lo, hi = LOG_SCALE_BOUNDS
        out = {}
        for name, head in self.heads.items():
            loc, ls = head(h).chunk(2, dim=1)
            out[f"{name}_loc"] = loc
            out[f"{name}_log_scale"] = _soft_clamp(ls, lo, hi)
        out["log_flux_rel"] = out.pop("log_flux_loc")
        out["offset_loc"] = out["offset_loc"] + centroids[:, :2]
        return out

    def forward(self, images, sigmas, psf_fwhm, valid=None) -> dict[str, torch.Tensor]:
        """``q`` of cutouts ``images (N, B, n, n)`` with noise ``sigmas (N, B)`` and PSF FWHM
        (pixels) ``psf_fwhm (N, B)`` or ``(B,)``; ``valid`` as in :func:`cutout_input`."""
        s = torch.as_tensor(sigmas, dtype=torch.float32)
        x = cutout_input(images, s, valid, self.softening)
        if x.shape[1:] != (self.n_bands + 1, self.stamp_size, self.stamp_size):
            raise ValueError(
                f"expected cutouts of shape (N, {self.n_bands}, {self.stamp_size}, "
                f"{self.stamp_size}), got {tuple(x.shape[:1]) + (x.shape[1] - 1,) + x.shape[2:]}"
            )
        if self.convs[0].weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        cen = centroid_features(images, s, valid)
        out = self.forward_raw(x, band_features(s, psf_fwhm), cen)
        out["log_flux_loc"] = out.pop("log_flux_rel") + torch.log(s)
        return out


def gaussian_nll(target: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor):
    """Per-element negative log-density of ``target`` under ``N(loc, exp(log_scale)^2)``."""
    return 0.5 * ((target - loc) * torch.exp(-log_scale)) ** 2 + log_scale + 0.5 * _LOG_2PI


# ----------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------
def _central_crop(a: np.ndarray, n: int) -> np.ndarray:
    size = a.shape[-1]
    if a.shape[-2] != size:
        raise DatasetError(f"scenes must be square, got {a.shape[-2]}x{size}")
    if size < n:
        raise DatasetError(
            f"scenes are {size} pixels wide, smaller than the {n}-pixel cutouts; simulate "
            f"larger scenes or choose stamp_size <= {size}"
        )
    i0 = (size - n) // 2
    return a if size == n else a[..., i0 : i0 + n, i0 : i0 + n]


def _render_model_frame(rows, frame: ModelFrame, shear=(0.0, 0.0), progress=False):
    """Noiseless targets centred in the prior's model frame, from their catalogue rows."""
    import galsim
    from tqdm.auto import tqdm

    from .simulate import _components

    n, scale, bands = frame.stamp_size, frame.pixel_scale, frame.bands
    psf = frame.psf()
    out = np.empty((len(rows), frame.n_bands, n, n), dtype=np.float32)
    for i, row in enumerate(tqdm(rows, desc="model-frame targets", disable=not progress)):
        unit = {k: row[k] for k in ("g1_int", "g2_int", "hlr_bulge", "hlr_disk")}
        for b in bands:
            unit[f"flux_bulge_{b}"] = unit[f"flux_disk_{b}"] = 1.0
        fb = np.array([float(row[f"flux_bulge_{b}"]) for b in bands])
        fd = np.array([float(row[f"flux_disk_{b}"]) for b in bands])
        bulge, disk = _components(unit, bands[0], shear)
        img = np.zeros((frame.n_bands, n, n))
        for comp, f in ((bulge, fb), (disk, fd)):
            if np.any(f > 0):
                a = galsim.Convolve(comp, psf).drawImage(nx=n, ny=n, scale=scale).array
                img += f[:, None, None] * a
        out[i] = img
    return out


def _encode_dihedral(prior, images: np.ndarray, chunk: int = 256, progress=False) -> np.ndarray:
    """``(N, 8, D)`` prior-encoder means of the 8 dihedral transforms of ``images``."""
    from tqdm.auto import tqdm

    n = len(images)
    out = np.empty((n, 8, prior.latent_dim), dtype=np.float32)
    bar = tqdm(total=n, desc="z targets (8 dihedral variants)", disable=not progress)
    with torch.inference_mode():
        for i in range(0, n, chunk):
            x = np.ascontiguousarray(images[i : i + chunk], dtype=np.float32)
            stack = np.concatenate([dihedral(x, g) for g in range(8)])
            loc, _ = prior.encode(torch.from_numpy(np.ascontiguousarray(stack)))
            out[i : i + len(x)] = loc.reshape(8, len(x), -1).transpose(0, 1).numpy()
            bar.update(len(x))
    bar.close()
    return out


@dataclass
class TrainingSet:
    """Cutouts of simulated blends with supervised targets for the amortized encoder.

    Attributes
    ----------
    image : ndarray ``(N, B, n, n)`` float32
        Central ``n x n`` cutout of each scene, bands in the prior's order.
    sigma : ndarray ``(N, B)``
        :func:`noise_sigma` of each cutout.
    psf_fwhm : ndarray ``(N, B)``
        :func:`psf_fwhm_pixels` of each scene's PSFs.
    log_flux : ndarray ``(N, B)``
        ``log`` of the target's true total flux per band (truth ``flux_<band>``).
    offset : ndarray ``(N, 2)``
        True ``(x, y)`` of the target minus the cutout centre, pixels.
    z : ndarray ``(N, 8, D)``
        Latent targets for each dihedral transform ``g`` of the cutout: the frozen prior's
        encoder mean of the target alone, transformed by ``g`` (see ``z_target``).
    bands : tuple of str
    z_target : {"model", "observed"}
        ``"model"`` (default): the target re-rendered from its truth catalogue row, noiseless and
        centred in the prior's model frame (its narrow model PSF) - exactly what the prior's
        encoder was trained on and what ``decode(z)`` must reproduce before the renderer shifts it
        and convolves it with the scene's PSF. ``"observed"``: the dataset's
        ``noiseless_target`` (observed PSF, true offset), cropped to the prior's stamp - PSF-
        broadened and shifted, hence biased as a morphology target; kept for comparison.
    meta : dict
        Where the data came from (dataset path / recipe, prior name and sha256, counts).
    extra : dict
        Optional per-scene arrays for diagnostics (``n_galaxies``, ``blendedness``).
    """

    image: np.ndarray
    sigma: np.ndarray
    psf_fwhm: np.ndarray
    log_flux: np.ndarray
    offset: np.ndarray
    z: np.ndarray
    bands: tuple[str, ...]
    z_target: str = "model"
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.image)
        if self.image.ndim != 4 or self.image.shape[-1] != self.image.shape[-2]:
            raise DatasetError(f"image must be (N, band, n, n), got {self.image.shape}")
        b = self.image.shape[1]
        for name, shape in (
            ("sigma", (n, b)),
            ("psf_fwhm", (n, b)),
            ("log_flux", (n, b)),
            ("offset", (n, 2)),
        ):
            if getattr(self, name).shape != shape:
                raise DatasetError(
                    f"{name} must have shape {shape}, got {getattr(self, name).shape}"
                )
        if self.z.ndim != 3 or self.z.shape[:2] != (n, 8):
            raise DatasetError(f"z must have shape ({n}, 8, D), got {self.z.shape}")
        for name in ("sigma", "psf_fwhm", "log_flux", "offset", "z"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise DatasetError(f"{name} holds non-finite values")

    def __len__(self) -> int:
        return len(self.image)

    @property
    def stamp_size(self) -> int:
        return int(self.image.shape[-1])

    @property
    def latent_dim(self) -> int:
        return int(self.z.shape[-1])

    @classmethod
    def from_dataset(
        cls,
        path,
        prior,
        stamp_size: int | None = None,
        z_target: str = "model",
        limit: int | None = None,
        progress: bool = True,
        cache_dir=None,
    ) -> TrainingSet:
        """Build a training set from a blend dataset written by ``probdeblend simulate``.

        Parameters
        ----------
        path : path-like
            Dataset directory (``kind="blend"``, with ``image``, ``variance``, ``psf``,
            ``noiseless_target`` and a truth table with ``is_target``, ``x``, ``y``,
            ``flux_<band>`` and the catalogue columns).
        prior : LearnedPrior or str
            The frozen prior (or its name / path) whose latent space is the target.
        stamp_size : int, optional
            Cutout size (default: the scenes' size); the central cutout of each scene is used.
        z_target : {"model", "observed"}
            See the class docstring.
        limit : int, optional
            Use only the first ``limit`` scenes.
        progress : bool
        cache_dir : path-like, optional
            The latent targets (the slow part: rendering + 8 encodings per scene) are cached
            there as ``targets-<key>.npz``, keyed by the dataset, the prior's sha256, the
            mode and ``limit``.
        """
        from .dataset import load_dataset

        prior = _as_prior(prior)
        if z_target not in ("model", "observed"):
            raise ValueError(f"z_target must be 'model' or 'observed', got {z_target!r}")
        frame = prior.full_frame
        path = Path(path)
        arrays, truth, meta = load_dataset(path, keys=("image",), truth=True)
        if meta.get("kind") != "blend":
            raise DatasetError(
                f"{path} holds kind={meta.get('kind')!r} items; the amortized encoder trains "
                f"on blends: `probdeblend simulate --kind blend`"
            )
        ds_bands = tuple(meta["bands"])
        missing = [b for b in frame.bands if b not in ds_bands]
        if missing:
            raise UnknownBandError(
                f"dataset {path} has no band(s) {missing} of the prior {prior.name!r} "
                f"(dataset bands {list(ds_bands)}, prior bands {list(frame.bands)})"
            )
        ds_scale = float(meta["frame"]["pixel_scale"])
        if not math.isclose(ds_scale, frame.pixel_scale, rel_tol=1e-6):
            raise DatasetError(
                f"dataset pixel scale {ds_scale} differs from the prior's {frame.pixel_scale}"
            )
        idx = [ds_bands.index(b) for b in frame.bands]
        same = idx == list(range(len(ds_bands)))
        n_all = arrays["image"].shape[0]
        n = min(n_all, int(limit)) if limit else n_all
        size = arrays["image"].shape[-1]
        stamp = int(stamp_size or size)

        def take(a):
            a = a[:n]
            a = a if same else a[:, idx]
            out = np.ascontiguousarray(_central_crop(a, stamp), dtype=np.float32)
            # a view of the first `limit` scenes would keep the whole array alive
            return out.copy() if out.base is not None and n < n_all else out

        image = take(arrays.pop("image"))
        del arrays
        var = take(load_dataset(path, keys=("variance",), truth=False)[0]["variance"])
        sigma = noise_sigma(var).astype(np.float32)
        del var
        psf = load_dataset(path, keys=("psf",), truth=False)[0]["psf"][:n]
        psf_fwhm = psf_fwhm_pixels(psf if same else psf[:, idx]).astype(np.float32)
        if psf_fwhm.ndim == 1:  # one PSF for the whole dataset
            psf_fwhm = np.broadcast_to(psf_fwhm, (n, len(idx))).copy()
        del psf

        tgt = truth[np.asarray(truth["is_target"], dtype=bool)]
        tgt.sort("item")
        items = np.asarray(tgt["item"])
        if len(tgt) < n or not np.array_equal(items[:n], np.arange(n)):
            raise DatasetError(f"{path}: the truth table must hold one target row per scene")
        tgt = tgt[:n]
        centre = (stamp - 1) / 2.0
        off0 = (size - stamp) // 2  # crop origin in scene pixels
        offset = np.stack(
            [np.asarray(tgt["x"]) - off0 - centre, np.asarray(tgt["y"]) - off0 - centre], -1
        ).astype(np.float32)
        flux = np.stack([np.asarray(tgt[f"flux_{b}"], dtype=np.float64) for b in frame.bands], -1)
        if np.any(~np.isfinite(flux) | (flux <= 0)):
            raise DatasetError(f"{path}: target fluxes must be positive and finite")
        log_flux = np.log(flux).astype(np.float32)

        key = hashlib.sha256(
            json.dumps(
                [
                    str(path.resolve()),
                    meta.get("seed"),
                    meta.get("n"),
                    n,
                    stamp,
                    z_target,
                    prior.card.get("sha256", prior.name),
                ],
                default=str,
            ).encode()
        ).hexdigest()[:16]
        cache = Path(cache_dir) / f"targets-{key}.npz" if cache_dir is not None else None
        if cache is not None and cache.is_file():
            z = np.load(cache)["z"]
        else:
            if z_target == "model":
                shear = tuple((meta.get("blend") or {}).get("shear", (0.0, 0.0)))
                clean = _render_model_frame(tgt, frame, shear, progress=progress)
            else:
                nt = load_dataset(path, keys=("noiseless_target",), truth=False)[0]
                nt = nt["noiseless_target"][:n]
                clean = _fit_stamp(nt if same else nt[:, idx], frame.stamp_size)
            z = _encode_dihedral(prior, clean, progress=progress)
            del clean
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}.npz")
                np.savez(tmp, z=z)
                os.replace(tmp, cache)
        extra = {"n_galaxies": np.bincount(np.asarray(truth["item"]), minlength=n_all)[:n]}
        if "blendedness_total" in tgt.colnames:
            extra["blendedness"] = np.asarray(tgt["blendedness_total"], dtype=np.float32)
        info = {
            "dataset": str(path),
            "dataset_meta": meta,
            "n_scenes": int(n),
            "stamp_size": stamp,
            "z_target": z_target,
            "prior": prior.name,
            "prior_sha256": prior.card.get("sha256"),
        }
        return cls(image, sigma, psf_fwhm, log_flux, offset, z, frame.bands, z_target, info, extra)


def _fit_stamp(a: np.ndarray, n: int) -> np.ndarray:
    """Central crop or zero-pad of ``(..., s, s)`` images to ``n x n`` (same centre pixel)."""
    s = a.shape[-1]
    if s >= n:
        return _central_crop(a, n)
    out = np.zeros(a.shape[:-2] + (n, n), dtype=a.dtype)
    i0 = (n - s) // 2
    out[..., i0 : i0 + s, i0 : i0 + s] = a
    return out


def _as_prior(prior):
    if isinstance(prior, (str, os.PathLike)):
        from .priors.io import load_prior

        return load_prior(prior)
    return prior


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class AmortizedTrainConfig:
    """Recipe of an amortized-encoder training run (stored in the model card).

    Parameters
    ----------
    channels : tuple of int
        Widths of the stride-2 convolutions (:class:`AmortizedEncoder`).
    hidden : int
        Width of the MLP head.
    epochs, batch_size : int
    lr : float
        Adam learning rate; cosine decay per step to ``lr_min_factor * lr``.
    weight_decay : float
    grad_clip : float or None
        Global gradient-norm clip (None = off).
    seed : int
        Seeds the weights (``torch.manual_seed``), the split, the shuffling and the augmentation
        (``numpy.random.default_rng([seed, epoch])``).
    val_fraction : float
        Scenes held out (never trained on) for validation.
    augment : bool
        Random dihedral transform (8 rotations / flips) of every training cutout, with the
        offset and latent targets transformed accordingly.
    mask_prob : float
        Probability that a training cutout loses a strip (1 to n/3 pixels) along one random
        edge (zero, weight 0), as cutouts near scene edges do.
    num_threads : int or None
        ``torch.set_num_threads`` for the run.
    channels_last : bool
        Channels-last memory format (faster convolutions on CPU).
    metric_band : str
        Band of the flux metrics reported in the card (falls back to the middle band).
    """

    channels: tuple[int, ...] = AMORTIZED_CHANNELS
    hidden: int = 256
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_min_factor: float = 0.01
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    seed: int = 0
    val_fraction: float = 0.1
    augment: bool = True
    mask_prob: float = 0.1
    num_threads: int | None = None
    channels_last: bool = True
    metric_band: str = "r"
    nll_beta: float = 0.5
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        for name in ("epochs", "batch_size", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_RESUME_FREE = ("epochs", "num_threads", "extra", "metric_band")


def split_scenes(n: int, config: AmortizedTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(train, val)`` scene indices (depends on ``n`` and ``config.seed`` only)."""
    perm = np.random.default_rng([int(config.seed), 7]).permutation(int(n))
    n_val = int(round(config.val_fraction * n))
    if config.val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _batch(data: TrainingSet, idx, g=None, strips=None):
    """Tensors of scenes ``idx`` transformed by dihedral elements ``g`` with edge ``strips``.

    ``strips`` is ``(len(idx), 2)`` ints: side (0-3, or -1 for none) and width in pixels.
    """
    idx = np.asarray(idx)
    img = data.image[idx]
    n = img.shape[-1]
    off = data.offset[idx].astype(np.float64)
    if g is None:
        g = np.zeros(len(idx), dtype=np.int64)
    else:
        out = np.empty_like(img)
        for gg in np.unique(g):
            sel = g == gg
            out[sel] = dihedral(img[sel], int(gg))
        img = out
        off = np.einsum("nij,nj->ni", DIHEDRAL_MATRICES[g], off)
    z = data.z[idx, g]
    valid = None
    if strips is not None and np.any(strips[:, 0] >= 0):
        valid = np.ones((len(idx), 1, n, n), dtype=np.float32)
        for k in np.flatnonzero(strips[:, 0] >= 0):
            side, w = int(strips[k, 0]), int(strips[k, 1])
            sl = [slice(None), slice(None)]
            sl[side // 2] = slice(0, w) if side % 2 == 0 else slice(n - w, n)
            valid[k, 0][tuple(sl)] = 0.0
        img = img * valid
    return {
        "images": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
        "sigmas": torch.from_numpy(data.sigma[idx]),
        "psf_fwhm": torch.from_numpy(data.psf_fwhm[idx]),
        "valid": None if valid is None else torch.from_numpy(valid),
        "z": torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)),
        "log_flux": torch.from_numpy(data.log_flux[idx]),
        "offset": torch.from_numpy(off.astype(np.float32)),
    }


def _nll_terms(out: dict, batch: dict, beta: float = 0.0) -> dict:
    """Per-scene NLL terms; ``beta > 0`` weights each element by ``stop_grad(scale^(2 beta))``
    (beta-NLL, Seitzer et al. 2022) - a training loss, equal to the NLL for ``beta = 0``."""
    terms = {}
    for key, tkey in (("z", "z"), ("flux", "log_flux"), ("offset", "offset")):
        loc = out[f"{tkey}_loc"]
        ls = out[f"{tkey}_log_scale"]
        e = gaussian_nll(batch[tkey], loc, ls)
        if beta:
            e = e * torch.exp(2.0 * beta * ls.detach())
        terms[f"nll_{key}"] = e.sum(-1)
    terms["nll"] = terms["nll_z"] + terms["nll_flux"] + terms["nll_offset"]
    return terms


def _predict_tensors(model, data: TrainingSet, idx, chunk: int = 512) -> tuple[dict, dict]:
    """Predictions (numpy, identity transform) on scenes ``idx`` and the summed NLL terms."""
    outs: dict[str, list] = {}
    nll: dict[str, float] = {}
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(idx), chunk):
            b = _batch(data, idx[i : i + chunk])
            o = model(b["images"], b["sigmas"], b["psf_fwhm"])
            for k, v in _nll_terms(o, b).items():
                nll[k] = nll.get(k, 0.0) + float(v.sum())
            for k, v in o.items():
                outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}, nll


def evaluate_amortized(model, data: TrainingSet, idx, metric_band: str = "r") -> dict:
    """Validation metrics of ``model`` on scenes ``idx`` of ``data`` (no augmentation).

    Returns a dict with: ``nll`` (mean per scene, nats; ``nll_z``, ``nll_flux``,
    ``nll_offset``), ``offset_error_median_px`` (median Euclidean error of ``offset_loc``),
    ``log_flux_residual_median`` / ``log_flux_residual_nmad`` in ``metric_band``
    (``NMAD = 1.4826 * median |r - median r|``) and per band, ``z_residual_rms`` (over scenes
    and latent dimensions) next to ``z_true_rms`` (the spread of the targets, the error of a
    no-information guess), and the coverage of the 68% intervals ``loc +- scale``:
    ``coverage68_log_flux`` (metric band), ``coverage68_offset_x``, ``coverage68_z_mean`` (mean
    over latent dimensions) and ``coverage68_z`` (per dimension). A calibrated ``q`` gives 0.683.
    """
    idx = np.asarray(idx)
    bands = list(data.bands)
    bi = bands.index(metric_band) if metric_band in bands else len(bands) // 2
    if len(idx) == 0:
        return {"n": 0}
    p, nll = _predict_tensors(model, data, idx)
    zt, ft, ot = data.z[idx, 0], data.log_flux[idx], data.offset[idx]
    terms = {k: v / len(idx) for k, v in nll.items()}
    fres = p["log_flux_loc"] - ft
    med = np.median(fres, axis=0)
    nmad = 1.4826 * np.median(np.abs(fres - med), axis=0)

    def cover(true, loc, ls):
        return np.mean(np.abs(true - loc) < np.exp(ls), axis=0)

    cz = cover(zt, p["z_loc"], p["z_log_scale"])
    err = np.linalg.norm(p["offset_loc"] - ot, axis=-1)
    cen = np.concatenate(
        [
            centroid_features(data.image[idx[i : i + 512]], data.sigma[idx[i : i + 512]])[:, :2]
            for i in range(0, len(idx), 512)
        ]
    )
    err_cen = np.linalg.norm(cen - ot, axis=-1)
    return {
        "n": int(len(idx)),
        **terms,
        "offset_error_median_px": float(np.median(err)),
        "offset_error_rms_px": float(np.sqrt(np.mean(err**2))),
        "centroid_offset_error_median_px": float(np.median(err_cen)),
        "centroid_offset_error_rms_px": float(np.sqrt(np.mean(err_cen**2))),
        "metric_band": bands[bi],
        "log_flux_residual_median": float(med[bi]),
        "log_flux_residual_nmad": float(nmad[bi]),
        "log_flux_residual_median_per_band": dict(zip(bands, med.tolist(), strict=True)),
        "log_flux_residual_nmad_per_band": dict(zip(bands, nmad.tolist(), strict=True)),
        "z_residual_rms": float(np.sqrt(np.mean((p["z_loc"] - zt) ** 2))),
        "z_true_rms": float(np.sqrt(np.mean((zt - zt.mean(0)) ** 2))),
        "coverage68_log_flux": float(
            cover(ft[:, bi], p["log_flux_loc"][:, bi], p["log_flux_log_scale"][:, bi])
        ),
        "coverage68_offset_x": float(
            cover(ot[:, 0], p["offset_loc"][:, 0], p["offset_log_scale"][:, 0])
        ),
        "coverage68_z_mean": float(cz.mean()),
        "coverage68_z": cz.tolist(),
    }


def _init_output(model: AmortizedEncoder, data: TrainingSet, idx) -> None:
    """Start from the population: output biases = target means / log spreads, small weights."""
    d = model.latent_dim
    z = data.z[idx].reshape(-1, d)
    rel = data.log_flux[idx] - np.log(data.sigma[idx])
    off = data.offset[idx]

    def log_sd(a):
        return np.log(np.maximum(a.std(0), 1e-3))

    cen = centroid_features(data.image[idx[:2048]], data.sigma[idx[:2048]]).numpy()[:, :2]
    off_res = off[:2048] - cen  # the offset head predicts the correction to the centroid
    bias = {
        "z": (z.mean(0), log_sd(z)),
        "log_flux": (rel.mean(0), log_sd(rel)),
        "offset": (np.median(off_res, 0), log_sd(off)),
    }
    with torch.no_grad():
        for name, (loc, ls) in bias.items():
            last = model.heads[name][-1]
            last.weight.mul_(0.1)
            last.bias.copy_(torch.as_tensor(np.concatenate([loc, ls]), dtype=torch.float32))


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = Path(str(path) + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_amortized(
    data: TrainingSet,
    config: AmortizedTrainConfig | None = None,
    out_dir=None,
    progress: bool = True,
    resume: bool = False,
    callback=None,
):
    """Train an :class:`AmortizedEncoder` on ``data`` by Gaussian negative log-likelihood.

    The loss per scene is ``-log q(z_true) - log q(log_flux_true) - log q(offset_true)`` under
    the predicted diagonal Gaussians (summed over dimensions), averaged over the batch; Adam
    with a per-step cosine learning-rate decay. Every training cutout gets a random dihedral
    transform (with its offset and latent targets transformed accordingly: the latent target of
    transform ``g`` is the prior's encoding of the transformed clean target, precomputed in
    :class:`TrainingSet`) and, with probability ``mask_prob``, a masked edge strip.

    Parameters
    ----------
    data : TrainingSet
    config : AmortizedTrainConfig
    out_dir : path-like, optional
        ``checkpoint.pt`` is written there after every epoch (weights, optimiser, scheduler,
        history); ``None`` writes none.
    progress : bool
        tqdm progress bar with the running loss.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` (same configuration except ``epochs``,
        ``num_threads``): the result is identical to an uninterrupted run.
    callback : callable, optional
        ``callback(epoch, history)`` after each epoch; returning True stops training.

    Returns
    -------
    model : AmortizedEncoder
        Eval mode, contiguous memory format.
    history : dict
        Per-epoch ``train_nll``, ``val_nll``, ``lr``, ``scenes_per_s``, ``epoch_wall_s``;
        ``val_nll_init`` (before training), ``n_train``, ``n_val``.
    """
    from tqdm.auto import tqdm

    config = config or AmortizedTrainConfig()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    torch.set_flush_denormal(True)
    train_idx, val_idx = split_scenes(len(data), config)
    if len(train_idx) == 0:
        raise ValueError(
            f"no training scenes: {len(data)} scenes, val_fraction {config.val_fraction}"
        )
    torch.manual_seed(config.seed)
    model = AmortizedEncoder(
        data.image.shape[1], data.stamp_size, data.latent_dim, config.channels, config.hidden
    )
    _init_output(model, data, train_idx)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bs = int(config.batch_size)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / bs))
    total = config.epochs * steps_per_epoch
    m = config.lr_min_factor

    def lr_at(step):
        frac = min(step, total) / max(1, total)
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: dict = {
        k: [] for k in ("epoch", "train_nll", "val_nll", "lr", "scenes_per_s", "epoch_wall_s")
    }
    history.update(n_train=int(len(train_idx)), n_val=int(len(val_idx)))
    ckpt = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume and ckpt is not None and ckpt.is_file():
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        old = {k: v for k, v in ck["config"].items() if k not in _RESUME_FREE}
        new = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
        old["channels"] = tuple(old["channels"])
        if old != new or ck["n_scenes"] != len(data):
            raise ValueError(
                f"checkpoint {ckpt} was written with another configuration or data set "
                f"({ck['n_scenes']} scenes); use another out_dir or resume=False"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        history = ck["history"]
        start = int(ck["epoch"])
    else:
        v = evaluate_amortized(model, data, val_idx) if len(val_idx) else {"nll": float("nan")}
        history["val_nll_init"] = v["nll"]

    n = data.stamp_size
    for epoch in range(start, config.epochs):
        rng = np.random.default_rng([int(config.seed), epoch])
        order = rng.permutation(train_idx)
        if config.augment:
            g_all = rng.integers(0, 8, len(order))
        else:
            g_all = np.zeros(len(order), dtype=np.int64)
        strips = np.stack(
            [
                np.where(
                    rng.uniform(size=len(order)) < config.mask_prob,
                    rng.integers(0, 4, len(order)),
                    -1,
                ),
                rng.integers(1, max(2, n // 3 + 1), len(order)),
            ],
            -1,
        )
        model.train()
        tot, t0 = 0.0, time.perf_counter()
        bar = tqdm(
            range(0, len(order), bs),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        for i in bar:
            sl = slice(i, i + bs)
            b = _batch(data, order[sl], g_all[sl], strips[sl])
            out = model(b["images"], b["sigmas"], b["psf_fwhm"], b["valid"])
            loss = _nll_terms(out, b, config.nll_beta)["nll"].mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {float(loss)} at epoch {epoch + 1}; lower lr "
                    f"({config.lr}) or set grad_clip"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(b["z"])
            bar.set_postfix(nll=f"{float(loss.detach()):.4g}", refresh=False)
        bar.close()
        wall = time.perf_counter() - t0
        v = evaluate_amortized(model, data, val_idx) if len(val_idx) else {"nll": float("nan")}
        history["epoch"].append(epoch + 1)
        history["train_nll"].append(tot / len(order))
        history["val_nll"].append(v["nll"])
        history["lr"].append(opt.param_groups[0]["lr"])
        history["scenes_per_s"].append(len(order) / wall)
        history["epoch_wall_s"].append(wall)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs}: train nll {tot / len(order):.4g}  "
                f"val nll {v['nll']:.4g}  ({len(order) / wall:.0f} scenes/s)"
            )
        if ckpt is not None:
            _atomic_torch_save(
                {
                    "epoch": epoch + 1,
                    "config": config.to_dict(),
                    "n_scenes": len(data),
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "history": history,
                },
                ckpt,
            )
        if callback is not None and callback(epoch + 1, history):
            break
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return model, history


def build_amortized(
    data: TrainingSet,
    prior,
    out,
    config: AmortizedTrainConfig | None = None,
    workdir=None,
    progress: bool = True,
    resume: bool = False,
    data_recipe: dict | None = None,
) -> Path:
    """Train, validate and save ``out.{safetensors,json}``; return the card path.

    ``prior`` (a :class:`~probdeblend.priors.LearnedPrior` or name) must be the one ``data``
    was built with; its name and sha256 go into the card. Checkpoints go to ``workdir``
    (default ``runs/<out name>-checkpoint``). The card's ``validation`` holds
    :func:`evaluate_amortized` on the held-out scenes.
    """
    from .priors.io import machine_description

    config = config or AmortizedTrainConfig()
    prior = _as_prior(prior)
    sha = prior.card.get("sha256")
    if data.meta.get("prior_sha256") not in (None, sha):
        raise ValueError(
            f"the training set's latent targets come from prior sha256 "
            f"{data.meta['prior_sha256']} but the given prior has {sha}; rebuild the TrainingSet"
        )
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else Path("runs") / f"{out.name}-checkpoint"
    t0 = time.perf_counter()
    model, history = train_amortized(data, config, workdir, progress=progress, resume=resume)
    wall = time.perf_counter() - t0
    _, val_idx = split_scenes(len(data), config)
    metrics = evaluate_amortized(model, data, val_idx, config.metric_band)
    bench_idx = val_idx if len(val_idx) else np.arange(len(data))
    bench_idx = np.resize(bench_idx, 256)  # one batch of 256 real cutouts (repeated if fewer)
    performance = measure_throughput(
        AmortizedPosterior(model, prior.full_frame),
        data.image[bench_idx],
        data.sigma[bench_idx],
        data.psf_fwhm[bench_idx],
    )
    model.to(memory_format=torch.contiguous_format)
    training = {
        **config.to_dict(),
        "optimizer": "Adam",
        "lr_schedule": "cosine per step",
        "loss": "Gaussian NLL of z, log-flux, offset under the predicted diagonal q (summed)",
        "epochs_run": len(history["epoch"]),
        "n_train": history["n_train"],
        "n_val": history["n_val"],
        "wall_time_s": wall,
        "scenes_per_s": float(np.median(history["scenes_per_s"]))
        if history["scenes_per_s"]
        else None,
        "history": {k: v for k, v in history.items() if isinstance(v, list)},
        "val_nll_init": history.get("val_nll_init"),
        "machine": machine_description(),
    }
    recipe = {k: v for k, v in data.meta.items() if k not in ("prior", "prior_sha256")}
    recipe.update(data_recipe or {})
    card = {
        "name": out.name,
        "frame": prior.full_frame,
        "prior": {"name": prior.name, "sha256": sha},
        "training": training,
        "data": recipe,
        "validation": metrics,
        "performance": performance,
    }
    return save_amortized(out, model, card)


def measure_throughput(posterior, cutouts, sigmas, psf_fwhm, repeats: int = 5) -> dict:
    """Sources per second of :meth:`AmortizedPosterior.predict_batch` on one batch.

    The batch (all of ``cutouts`` in one forward pass) is run once to warm up, then
    ``repeats`` times; the median time is reported with the thread count and the shape.
    """
    n = len(cutouts)
    posterior.predict_batch(cutouts, sigmas, psf_fwhm, batch_size=n)
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        posterior.predict_batch(cutouts, sigmas, psf_fwhm, batch_size=n)
        times.append(time.perf_counter() - t0)
    return {
        "sources_per_s": float(n / np.median(times)),
        "sources_per_s_best": float(n / np.min(times)),
        "batch": int(n),
        "cutout_shape": list(np.shape(cutouts)[1:]),
        "torch_threads": torch.get_num_threads(),
        "what": "AmortizedPosterior.predict_batch (normalisation + forward pass), CPU",
    }


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------
def _architecture(model: AmortizedEncoder) -> dict:
    return {
        **model.config(),
        "input": (
            "cutout_input: asinh(image_b / sigma_b / softening) * valid_b per band, plus a "
            "coverage plane; sigma_b = sqrt(median variance of the cutout)"
        ),
        "band_features": "log(sigma_b) - mean_b log(sigma_b), log(psf_fwhm_b [pixels])",
        "outputs": {
            "z": "latent of the prior (loc, log_scale)",
            "log_flux": "ln(total flux per band) in the scene's flux unit (loc, log_scale)",
            "offset": "(dx, dy) pixels from the cutout centre (loc, log_scale)",
        },
    }


def save_amortized(stem, model: AmortizedEncoder, card: Mapping) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (model card with sha256); return the card.

    ``card`` must give ``frame`` (the prior's :class:`ModelFrame` or its dict) and ``prior``
    (``{"name": ..., "sha256": ...}``); ``name`` defaults to the stem; ``training``, ``data``
    and ``validation`` are stored as given. ``kind``, ``architecture`` and ``format_version``
    are filled in.
    """
    from .priors.io import save_weights

    card = dict(card)
    for key in ("frame", "prior"):
        if key not in card:
            raise PriorLoadError(f"card must give {key!r} (see save_amortized)")
    frame = (
        card["frame"]
        if isinstance(card["frame"], ModelFrame)
        else ModelFrame.from_dict(card["frame"])
    )
    if frame.n_bands != model.n_bands:
        raise PriorLoadError(
            f"card['frame'] has {frame.n_bands} bands {list(frame.bands)} but the encoder has "
            f"{model.n_bands}"
        )
    arch = _architecture(model)
    arch.update(card.pop("architecture", {}) or {})
    out = {
        "format_version": _FORMAT_VERSION,
        "name": card.pop("name", Path(stem).name),
        "kind": KIND,
        "architecture": arch,
        "frame": frame.to_dict(),
        "prior": dict(card.pop("prior")),
        "training": card.pop("training", {}),
        "data": card.pop("data", {}),
        "validation": card.pop("validation", {}),
    }
    card.pop("frame")
    card.pop("kind", None)
    out.update(card)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    return save_weights(stem, tensors, out)


def list_amortized(directory=None) -> list[str]:
    """Names of the amortized models in ``directory`` (default: the shipped priors folder)."""
    from .priors.io import list_weight_files, shipped_priors_dir

    d = Path(directory) if directory is not None else shipped_priors_dir()
    return list_weight_files(d, kinds=(KIND,))


def load_amortized(name_or_path) -> AmortizedPosterior:
    """Load an amortized posterior saved by :func:`save_amortized`.

    ``name_or_path``: a name in the shipped priors folder (``"lsst-vae-amortized"``) or the
    path of the card, the weights or their stem. The weights' sha256 is checked against the
    card (:class:`~probdeblend.errors.ChecksumMismatchError`).
    """
    from .priors.io import load_weights

    tensors, card = load_weights(
        name_or_path, ("name", "kind"), what="amortized model", available=list_amortized
    )
    where = card.get("name", str(name_or_path))
    if card["kind"] != KIND:
        raise PriorLoadError(
            f"{where!r} is a {card['kind']!r} model, not an amortized encoder; load priors with "
            f"probdeblend.load_prior"
        )
    missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise PriorLoadError(
            f"the model card of {where!r} is missing the keys {missing}; re-generate it with "
            f"save_amortized"
        )
    try:
        frame = ModelFrame.from_dict(card["frame"])
        arch = card["architecture"]
        model = AmortizedEncoder(
            arch["n_bands"],
            arch["stamp_size"],
            arch["latent_dim"],
            tuple(arch["channels"]),
            arch.get("hidden", 256),
            arch.get("softening", ASINH_SOFTENING),
        )
        sd = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(sd, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PriorLoadError(
            f"amortized model {where!r}: weights do not fit the card's architecture / frame "
            f"({e}); the card and weights must come from the same save_amortized call"
        ) from e
    return AmortizedPosterior(model, frame, card)


# ----------------------------------------------------------------------------------------------
# User-facing posterior
# ----------------------------------------------------------------------------------------------
class AmortizedPosterior:
    """Amortized ``q(z, log_flux, offset | cutout)`` for every source of a scene.

    Parameters
    ----------
    model : AmortizedEncoder
        Trained network (frozen here: eval mode, no gradients, channels-last).
    frame : ModelFrame
        The prior's model frame: bands (in the network's order) and pixel scale.
    card : dict, optional
        Model card (``prior`` gives the prior's name and sha256).

    Examples
    --------
    >>> post = AmortizedPosterior.for_prior("lsst-vae")            # doctest: +SKIP
    >>> q = post.predict(scene)                                    # doctest: +SKIP
    >>> q["positions"], q["log_flux_loc"], q["z_scale"]            # doctest: +SKIP
    """

    def __init__(self, model: AmortizedEncoder, frame: ModelFrame, card: dict | None = None):
        if model.n_bands != frame.n_bands:
            raise ValueError(
                f"model has {model.n_bands} bands but the frame has {frame.n_bands} "
                f"({list(frame.bands)})"
            )
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model.to(memory_format=torch.channels_last)
        self.frame = frame
        self.card = dict(card or {})
        torch.set_flush_denormal(True)

    # -- attributes ----------------------------------------------------------------------------
    @property
    def bands(self) -> tuple[str, ...]:
        return self.frame.bands

    @property
    def stamp_size(self) -> int:
        """Side of the cutouts, pixels."""
        return self.model.stamp_size

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def name(self) -> str:
        return str(self.card.get("name", "unnamed-amortized"))

    @property
    def prior_name(self) -> str | None:
        return (self.card.get("prior") or {}).get("name")

    @property
    def prior_sha256(self) -> str | None:
        return (self.card.get("prior") or {}).get("sha256")

    def __repr__(self) -> str:
        return (
            f"AmortizedPosterior(name={self.name!r}, prior={self.prior_name!r}, "
            f"bands={list(self.bands)}, stamp_size={self.stamp_size}, "
            f"latent_dim={self.latent_dim})"
        )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path) -> AmortizedPosterior:
        """Same as :func:`load_amortized`."""
        return load_amortized(name_or_path)

    @classmethod
    def for_prior(cls, prior) -> AmortizedPosterior:
        """The shipped amortized posterior ``<prior-name>-amortized`` of a prior.

        ``prior`` is a prior name (``"lsst-vae"``) or a loaded
        :class:`~probdeblend.priors.LearnedPrior`. Raises
        :class:`~probdeblend.errors.PriorLoadError` when the encoder was trained against
        different prior weights (sha256) than the prior's: its latent targets would not match.
        """
        from .priors.io import read_card

        if isinstance(prior, str):
            name, sha = prior, None
            try:
                sha = read_card(prior).get("sha256")
            except PriorLoadError:
                pass  # prior not shipped: nothing to check against
        else:
            name, sha = prior.name, prior.card.get("sha256")
        post = load_amortized(name + SUFFIX)
        post.check_prior(sha)
        return post

    def check_prior(self, prior_or_sha) -> None:
        """Raise PriorLoadError if ``prior_or_sha`` (a prior or a sha256) is not the prior
        this encoder was trained against (``None`` checks nothing)."""
        sha = prior_or_sha
        if sha is not None and not isinstance(sha, str):
            sha = sha.card.get("sha256")
        if sha is not None and self.prior_sha256 is not None and sha != self.prior_sha256:
            raise PriorLoadError(
                f"amortized model {self.name!r} was trained against prior {self.prior_name!r} "
                f"with sha256 {self.prior_sha256}, but this prior's weights have sha256 {sha}; "
                f"retrain it with benchmarks/train_amortized.py"
            )

    # -- inference -----------------------------------------------------------------------------
    def _band_index(self, scene) -> list[int]:
        missing = [b for b in self.bands if b not in scene.bands]
        if missing:
            raise UnknownBandError(
                f"the scene has no band(s) {missing} needed by amortized model {self.name!r} "
                f"(scene bands {list(scene.bands)}, model bands {list(self.bands)}); provide "
                f"those bands or use a model trained on the scene's bands"
            )
        if not math.isclose(scene.pixel_scale, self.frame.pixel_scale, rel_tol=1e-6):
            raise ValueError(
                f"scene.pixel_scale={scene.pixel_scale} differs from the model frame pixel scale "
                f"{self.frame.pixel_scale} of {self.name!r}; resample the scene or use a model "
                f"trained at this pixel scale"
            )
        return [scene.bands.index(b) for b in self.bands]

    def cutouts(self, scene, positions=None) -> dict[str, np.ndarray]:
        """Cutouts of ``scene`` around ``positions`` (see the module conventions).

        Returns a dict: ``images`` ``(S, B, n, n)`` (bands in the model's order, zero where
        masked / outside), ``valid`` ``(S, B, n, n)`` (1 = data), ``sigmas`` ``(S, B)``,
        ``psf_fwhm`` ``(B,)`` (pixels), ``centres`` ``(S, 2)`` (scene ``(x, y)`` of the cutout
        centres).
        """
        idx = self._band_index(scene)
        pos = self._positions(scene, positions)
        n = self.stamp_size
        c = (n - 1) / 2.0
        img = np.asarray(scene.image)[idx]
        var = np.asarray(scene.variance)[idx]
        ok = ~np.asarray(scene.mask)[idx]
        nb, ny, nx = img.shape
        pad = ((0, 0), (n, n), (n, n))
        img_p = np.pad(img, pad)
        ok_p = np.pad(ok, pad)
        var_p = np.pad(var, pad, constant_values=np.inf)
        i0 = np.floor(pos - c + 0.5).astype(np.int64)  # (S, 2): x0, y0
        s = len(pos)
        images = np.empty((s, nb, n, n), dtype=np.float32)
        valid = np.empty((s, nb, n, n), dtype=np.float32)
        vcut = np.empty((s, nb, n, n), dtype=np.float32)
        for k, (x0, y0) in enumerate(i0):
            win = (slice(None), slice(y0 + n, y0 + 2 * n), slice(x0 + n, x0 + 2 * n))
            images[k], valid[k], vcut[k] = img_p[win], ok_p[win], var_p[win]
        sig = noise_sigma(vcut, valid)
        if np.any(~np.isfinite(sig)):  # a band without valid pixel in a cutout
            fallback = noise_sigma(var[None], ok[None])[0]
            fallback = np.where(np.isfinite(fallback), fallback, 1.0)
            sig = np.where(np.isfinite(sig), sig, fallback[None, :])
        fwhm = psf_fwhm_pixels(np.asarray(scene.psf)[idx])
        return {
            "images": images,
            "valid": valid,
            "sigmas": sig.astype(np.float32),
            "psf_fwhm": fwhm.astype(np.float32),
            "centres": (i0 + c).astype(np.float64),
        }

    @staticmethod
    def _positions(scene, positions) -> np.ndarray:
        if positions is None:
            positions = scene.positions
            if positions is None:
                raise PositionError(
                    "positions",
                    "the scene has no source positions; pass positions=(S, 2) array of (x, y) "
                    "pixels, or detect sources first (probdeblend.detection)",
                )
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim == 1 and pos.shape == (2,):
            pos = pos[None]
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise PositionError(
                "positions", f"expected shape (n_source, 2) of (x, y) pixels, got {pos.shape}"
            )
        if not np.all(np.isfinite(pos)):
            raise PositionError("positions", "hold NaN or inf; pass finite (x, y) pixels")
        ny, nx = scene.shape
        out = (
            (pos[:, 0] < -0.5)
            | (pos[:, 0] >= nx - 0.5)
            | (pos[:, 1] < -0.5)
            | (pos[:, 1] >= ny - 0.5)
        )
        if out.any():
            bad = np.flatnonzero(out)[:10].tolist()
            raise PositionError(
                "positions",
                f"source(s) {bad} lie outside the {nx}x{ny} image (valid x in [-0.5, "
                f"{nx - 0.5}), y in [-0.5, {ny - 0.5})); positions are 0-based pixels",
            )
        return pos

    def predict_batch(self, cutouts, sigmas, psf_fwhm, valid=None, batch_size: int = 256):
        """``q`` of a batch of prepared cutouts (throughput path, no scene handling).

        Parameters
        ----------
        cutouts : array ``(N, B, n, n)``
            Bands in :attr:`bands` order, zero where masked.
        sigmas : array ``(N, B)``
            :func:`noise_sigma` per cutout and band (same unit as ``cutouts``).
        psf_fwhm : array ``(N, B)`` or ``(B,)``
            :func:`psf_fwhm_pixels`.
        valid : array ``(N, B or 1, n, n)``, optional
        batch_size : int
            Cutouts per forward pass.

        Returns
        -------
        dict of float32 numpy arrays: ``z_loc``, ``z_scale`` ``(N, D)``; ``log_flux_loc``,
        ``log_flux_scale`` ``(N, B)``; ``offset_loc``, ``offset_scale`` ``(N, 2)`` (pixels from
        each cutout's centre).
        """
        x = np.asarray(cutouts, dtype=np.float32)
        s = np.asarray(sigmas, dtype=np.float32)
        f = np.asarray(psf_fwhm, dtype=np.float32)
        nb, n = self.model.n_bands, self.stamp_size
        if x.ndim != 4 or x.shape[1:] != (nb, n, n):
            raise ValueError(
                f"cutouts must have shape (N, {nb}, {n}, {n}) (bands {list(self.bands)}), got "
                f"{x.shape}"
            )
        if s.shape != x.shape[:2] or np.any(~np.isfinite(s) | (s <= 0)):
            raise ValueError(f"sigmas must be positive, finite, shape {x.shape[:2]}; got {s.shape}")
        if f.shape not in ((nb,), x.shape[:2]) or np.any(~np.isfinite(f) | (f <= 0)):
            raise ValueError(
                f"psf_fwhm must be positive and finite (pixels; see psf_fwhm_pixels) with shape "
                f"({nb},) or {x.shape[:2]}, got shape {f.shape}"
            )
        f = np.broadcast_to(f, x.shape[:2]).copy()
        keys = ("z", "log_flux", "offset")
        parts: dict[str, list] = {f"{k}_{w}": [] for k in keys for w in ("loc", "scale")}
        with torch.inference_mode():
            for i in range(0, len(x), int(batch_size)):
                sl = slice(i, i + int(batch_size))
                v = None if valid is None else torch.from_numpy(np.asarray(valid[sl], np.float32))
                o = self.model(
                    torch.from_numpy(x[sl]),
                    torch.from_numpy(s[sl]),
                    torch.from_numpy(f[sl]),
                    v,
                )
                for k in keys:
                    parts[f"{k}_loc"].append(o[f"{k}_loc"].numpy())
                    parts[f"{k}_scale"].append(torch.exp(o[f"{k}_log_scale"]).numpy())
        widths = {"z": self.latent_dim, "log_flux": nb, "offset": 2}
        return {
            k: (np.concatenate(v) if v else np.zeros((0, widths[k.rsplit("_", 1)[0]]), np.float32))
            for k, v in parts.items()
        }

    def predict(self, scene, positions=None, batch_size: int = 256) -> dict[str, np.ndarray]:
        """``q`` of every source of ``scene``: one cutout per position, one batched pass.

        Parameters
        ----------
        scene : Scene
            Must hold the model's bands (any order, extra bands ignored) at its pixel scale.
        positions : array ``(S, 2)``, optional
            ``(x, y)`` pixels of the sources (default ``scene.positions``).
        batch_size : int

        Returns
        -------
        dict of numpy arrays, one row per source: ``z_loc``, ``z_scale`` ``(S, D)``;
        ``log_flux_loc``, ``log_flux_scale`` ``(S, B)`` (natural log of the total flux in the
        scene's units, bands in :attr:`bands` order); ``offset_loc``, ``offset_scale``
        ``(S, 2)`` (pixels from the cutout centres); ``cutout_centres`` ``(S, 2)``;
        ``positions`` ``(S, 2)`` = ``cutout_centres + offset_loc`` (the refined centres).

        Raises
        ------
        UnknownBandError
            The scene lacks some of the model's bands (they are named).
        ValueError
            The scene's pixel scale differs from the model's.
        PositionError
            No positions, or positions outside the image.
        """
        c = self.cutouts(scene, positions)
        out = self.predict_batch(c["images"], c["sigmas"], c["psf_fwhm"], c["valid"], batch_size)
        out["cutout_centres"] = c["centres"]
        out["positions"] = c["centres"] + out["offset_loc"].astype(np.float64)
        return out
