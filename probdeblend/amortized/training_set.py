"""Supervised training sets for the encoder from GalSim blend datasets
(:mod:`probdeblend.dataset`), with targets from the frozen prior.

See :mod:`probdeblend.amortized` for the conventions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError, UnknownBandError
from ..priors.frame import ModelFrame
from .features import dihedral, noise_sigma, psf_fwhm_pixels


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

    from ..simulate import _components

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
        from ..dataset import load_dataset

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
        from ..priors.io import load_prior

        return load_prior(prior)
    return prior


