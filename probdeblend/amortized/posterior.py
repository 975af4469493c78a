"""The user-facing amortized posterior: cutouts of a Scene -> q for every source.

See :mod:`probdeblend.amortized` for the conventions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import PositionError, PriorLoadError, UnknownBandError
from ..priors.frame import ModelFrame
from .constants import SUFFIX
from .features import noise_sigma, psf_fwhm_pixels
from .io import read_amortized
from .network import AmortizedEncoder
from .q import AmortizedQ

#: Cutouts per encoder forward pass on CPU: on 2 cores (torch 2.13) batches of 64 run at
#: 0.22 ms per 6x48x48 cutout, batches of 256 at 0.32 ms (the activations of a large batch
#: fall out of cache; the same as the decoder's ``decode_numpy``).
ENCODER_BATCH = 64


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
        from ..priors.io import read_card

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
        i0 = np.floor(pos - c + 0.5).astype(np.int64)  # (S, 2): x0, y0
        cubes = (np.asarray(scene.image), np.asarray(scene.mask), np.asarray(scene.variance))
        images, masked, vcut = _gather_windows(cubes, idx, i0, n, (0.0, True, np.inf))
        valid = np.subtract(1.0, masked, dtype=np.float32)
        sig = noise_sigma(vcut, valid)
        if np.any(~np.isfinite(sig)):  # a band without valid pixel in a cutout
            var = np.asarray(scene.variance)[idx]
            fallback = noise_sigma(var[None], ~np.asarray(scene.mask)[idx][None])[0]
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

    def predict_batch(self, cutouts, sigmas, psf_fwhm, valid=None, batch_size: int = ENCODER_BATCH):
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
        out = self.forward_batch(x, s, f, valid, batch_size)
        widths = {"z": self.latent_dim, "log_flux": nb, "offset": 2}
        res = {}
        for k, w in widths.items():
            if len(x) == 0:
                res[f"{k}_loc"] = res[f"{k}_scale"] = np.zeros((0, w), np.float32)
                continue
            res[f"{k}_loc"] = out[f"{k}_loc"]
            res[f"{k}_scale"] = np.exp(out[f"{k}_log_scale"])
        return res

    def predict_q(self, scene, positions=None, batch_size: int = ENCODER_BATCH,
                  calibrated: bool = True) -> AmortizedQ:
        """q of every source of ``scene`` as an :class:`~probdeblend.amortized.q.AmortizedQ`
        (joint low-rank Gaussian over ``z``, ``log_flux``, ``offset`` and, with a shape head,
        ``e``); offsets refer to the cutout centres (``q.centres``).

        ``calibrated``: apply the card's ``calibration.q_widths`` (``{group: [c, gamma]}``,
        :meth:`AmortizedQ.rescaled`, fitted on held-out simulations by
        ``benchmarks/calibrate_q.py``) when there is one; ``False``: the network's raw q."""
        c = self.cutouts(scene, positions)
        out = self.forward_batch(c["images"], c["sigmas"], c["psf_fwhm"], c["valid"],
                                 batch_size)
        groups = dict(self.model.groups)
        loc = np.concatenate([out[f"{g}_loc"] for g in groups], -1).astype(np.float64)
        scale = np.exp(np.concatenate([out[f"{g}_log_scale"] for g in groups], -1)
                       .astype(np.float64))
        factor = out.get("factor", np.zeros(loc.shape + (0,))).astype(np.float64)
        q = AmortizedQ(loc, scale, factor, groups, c["centres"])
        widths = (self.card.get("calibration") or {}).get("q_widths")
        return q.rescaled(widths) if calibrated and widths else q

    def forward_batch(self, cutouts, sigmas, psf_fwhm, valid=None, batch_size: int = ENCODER_BATCH):
        """Raw network outputs (numpy) of prepared cutouts, in batches: ``{group}_loc``,
        ``{group}_log_scale`` and, for a low-rank q, ``factor`` ``(N, P, r)``.

        ``batch_size``: cutouts per forward pass (default ``ENCODER_BATCH``, the fastest on
        CPU; on a GPU pass thousands)."""
        x = np.asarray(cutouts, dtype=np.float32)
        s = np.asarray(sigmas, dtype=np.float32)
        f = np.broadcast_to(np.asarray(psf_fwhm, dtype=np.float32), x.shape[:2]).copy()
        parts: dict[str, list] = {}
        with torch.inference_mode():
            for i in range(0, len(x), int(batch_size)):
                sl = slice(i, i + int(batch_size))
                v = None if valid is None else torch.from_numpy(np.asarray(valid[sl], np.float32))
                o = self.model(torch.from_numpy(x[sl]), torch.from_numpy(s[sl]),
                               torch.from_numpy(f[sl]), v)
                for k, t in o.items():
                    parts.setdefault(k, []).append(t.numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def predict(self, scene, positions=None,
                batch_size: int = ENCODER_BATCH) -> dict[str, np.ndarray]:
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



def load_amortized(name_or_path) -> AmortizedPosterior:
    """Load an amortized posterior saved by :func:`~probdeblend.amortized.save_amortized`
    (a shipped name such as ``"lsst-vae-amortized"`` or a path); checksums are verified."""
    return AmortizedPosterior(*read_amortized(name_or_path))


def _gather_windows(cubes, bands, starts, n: int, fill):
    """``n x n`` windows of the ``bands`` (indices) of each ``(band, ny, nx)`` cube with
    pixel ``[0, 0]`` at ``starts`` ``(S, 2)`` (``x0, y0``), as float32 ``(S, len(bands), n,
    n)`` arrays; pixels outside the image hold ``fill`` (one value per cube).

    Windows are copied straight from the cubes (no padded copy of the image); a window that
    crosses the edge gets ``fill`` and its clipped overlap.
    """
    _, ny, nx = cubes[0].shape
    bands = np.asarray(bands, np.int64)
    all_bands = np.array_equal(bands, np.arange(cubes[0].shape[0]))
    out = [np.empty((len(starts), len(bands), n, n), dtype=np.float32) for _ in cubes]
    for k, (x0, y0) in enumerate(starts):
        ya, yb, xa, xb = max(y0, 0), min(y0 + n, ny), max(x0, 0), min(x0 + n, nx)
        edge = (ya, yb, xa, xb) != (y0, y0 + n, x0, x0 + n)
        for o, cube, f in zip(out, cubes, fill, strict=True):
            if edge:
                o[k] = f
            if yb > ya and xb > xa:
                win = cube[:, ya:yb, xa:xb]
                o[k, :, ya - y0:yb - y0, xa - x0:xb - x0] = win if all_bands else win[bands]
    return out
