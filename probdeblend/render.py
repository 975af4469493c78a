"""The physical forward model: model-frame galaxies -> an observed multi-band scene.

For every source ``s`` and band ``b`` the renderer takes the prior's decoded, flux-normalised
model-frame image ``m_sb`` (unit sum, convolved with the narrow model PSF), multiplies it by the
flux ``f_sb``, shifts it to the source position (sub-pixel, in Fourier space), convolves it with the
*difference kernel* ``D_b`` whose Fourier transform is ``PSF_b / PSF_model`` and sums the sources.
All of it happens in Fourier space on a padded grid, so the scene model is::

    scene_b = crop( IFFT[ D_b * sum_s f_sb * FFT(m_sb) * exp(-2 pi i (u dx_s + v dy_s)) ] )

with one FFT per source and band and one inverse FFT per band. Positions are differentiable.

Conventions: positions ``(x, y)`` in the Scene's 0-based pixel-centre convention (the centre of
``image[..., j, i]`` is ``(x=i, y=j)``); a model stamp of ``n`` pixels is centred at
``((n-1)/2, (n-1)/2)``; fluxes are the total flux of the PSF-convolved galaxy in image units.
Both PSFs are pixel-integrated images, so the pixel response cancels in the ratio.

One implementation serves both backends: :func:`render` takes the array namespace (``torch`` or
``jax.numpy``); :class:`SceneRenderer` precomputes the constant Fourier kernels from a
:class:`~probdeblend.Scene` and a prior's :class:`~probdeblend.priors.frame.ModelFrame` and hands
them to either backend.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidPSFError

__all__ = ["SceneRenderer", "render", "difference_kernel_ft", "fft_size"]

#: Largest |PSF_b / PSF_model| allowed in Fourier space before the model PSF counts as too wide.
_MAX_KERNEL_GAIN = 1.05


def fft_size(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast FFT length)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _centred_ft(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rfft2 of a centred (odd-sized) image placed with its centre pixel at the origin."""
    k = psf.shape[-1]
    pad = np.zeros(psf.shape[:-2] + shape, dtype=np.float64)
    pad[..., :k, :k] = psf
    pad = np.roll(pad, (-(k // 2), -(k // 2)), axis=(-2, -1))
    return np.fft.rfft2(pad)


def difference_kernel_ft(psf: np.ndarray, model_psf: np.ndarray, shape: tuple[int, int],
                         bands=None) -> np.ndarray:
    """Fourier transform of the difference kernel ``PSF_b / PSF_model`` on an FFT grid.

    Parameters
    ----------
    psf : array (band, k, k)
        Observed PSF images (odd size, unit sum, centred), on the scene's pixel grid.
    model_psf : array (k', k')
        The prior's model PSF on the same grid (odd, unit sum, centred).
    shape : (int, int)
        FFT grid (rows, columns).
    bands : sequence of str, optional
        Band names, for error messages.

    Returns
    -------
    complex128 array (band, rows, columns // 2 + 1).

    Raises
    ------
    InvalidPSFError
        If an observed PSF is narrower than the model PSF (the ratio would amplify noise).
    """
    obs = _centred_ft(np.asarray(psf, dtype=np.float64), shape)
    mod = _centred_ft(np.asarray(model_psf, dtype=np.float64), shape)
    ratio = obs * np.conj(mod) / (np.abs(mod) ** 2 + 1e-12)
    gain = np.abs(ratio).reshape(len(ratio), -1).max(-1)
    bad = np.flatnonzero(gain > _MAX_KERNEL_GAIN)
    if bad.size:
        names = [bands[i] if bands is not None else i for i in bad]
        raise InvalidPSFError(
            "psf",
            f"the observed PSF of band(s) {names} is narrower than the prior's model PSF "
            f"(Fourier gain {gain[bad].round(2).tolist()} > {_MAX_KERNEL_GAIN}); a learned prior "
            f"can only be convolved to wider PSFs — use a prior with a narrower model PSF",
        )
    return ratio


def render(stamps, fluxes, positions, kernel_ft, freqs, image_shape, xp):
    """Render sources into a scene. Backend-agnostic (``xp`` = ``torch`` or ``jax.numpy``).

    Parameters
    ----------
    stamps : array (..., source, band, n, n)
        Flux-normalised model-frame images (each band sums to 1).
    fluxes : array (..., source, band)
        Total flux of each source per band, in image units.
    positions : array (..., source, 2)
        (x, y) pixel positions in the scene convention.
    kernel_ft : complex array (band, FY, FX // 2 + 1)
        Difference-kernel transform from :func:`difference_kernel_ft`.
    freqs : (array (FY, 1), array (1, FX // 2 + 1))
        Spatial frequencies (cycles per pixel) of the FFT grid, rows and columns.
    image_shape : (int, int)
        (ny, nx) of the scene.
    xp : module
        ``torch`` or ``jax.numpy``.

    Returns
    -------
    array (..., band, ny, nx): the noiseless model scene.
    """
    fy, fx = freqs
    fft_shape = (fy.shape[0], 2 * (fx.shape[-1] - 1))
    n = stamps.shape[-1]
    centre = (n - 1) / 2.0
    dx = positions[..., 0] - centre
    dy = positions[..., 1] - centre
    phase = xp.exp(-2j * math.pi * (fx * dx[..., None, None] + fy * dy[..., None, None]))
    stamp_ft = xp.fft.rfft2(stamps * fluxes[..., None, None], s=fft_shape)
    total_ft = (stamp_ft * phase[..., None, :, :]).sum(-4)  # sum over sources
    scene = xp.fft.irfft2(total_ft * kernel_ft, s=fft_shape)
    return scene[..., : image_shape[0], : image_shape[1]]


class SceneRenderer:
    """Precomputed forward model for one scene and one prior frame.

    Parameters
    ----------
    psf : array (band, k, k)
        The scene's PSF images (``scene.psf``).
    image_shape : (int, int)
        (ny, nx) of the scene.
    model_psf : array (k', k')
        The prior's model PSF image on the scene's pixel grid (``frame.psf_image(k)``).
    stamp_size : int
        The prior's stamp size in pixels.
    bands : sequence of str, optional
        For error messages.

    Notes
    -----
    The FFT grid is at least ``ny + stamp_size + k`` by ``nx + stamp_size + k`` so that neither
    a stamp near an edge nor the PSF wings wrap around into the cropped scene.
    """

    def __init__(self, psf, image_shape, model_psf, stamp_size: int, bands=None):
        psf = np.asarray(psf, dtype=np.float64)
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.stamp_size = int(stamp_size)
        k = max(psf.shape[-1], np.asarray(model_psf).shape[-1])
        self.fft_shape = (fft_size(self.image_shape[0] + stamp_size + k),
                          fft_size(self.image_shape[1] + stamp_size + k))
        self.kernel_ft = difference_kernel_ft(psf, model_psf, self.fft_shape, bands)
        self.freqs = (np.fft.fftfreq(self.fft_shape[0])[:, None],
                      np.fft.rfftfreq(self.fft_shape[1])[None, :])

    @classmethod
    def from_scene(cls, scene, frame) -> SceneRenderer:
        """Renderer for a :class:`~probdeblend.Scene` and a prior's model frame.

        The scene's pixel scale must equal the frame's (no resampling is done).
        """
        if not math.isclose(scene.pixel_scale, frame.pixel_scale, rel_tol=1e-6):
            raise ValueError(
                f"scene.pixel_scale={scene.pixel_scale} differs from the prior's model frame "
                f"pixel scale {frame.pixel_scale}; resample the scene or use a prior trained at "
                f"this pixel scale"
            )
        k = scene.psf.shape[-1]
        return cls(scene.psf, scene.shape, frame.psf_image(k), frame.stamp_size, scene.bands)

    def __call__(self, stamps, fluxes, positions):
        """Render with the backend of ``stamps`` (torch tensor or JAX array); see :func:`render`."""
        kern = self.kernel_ft.astype(np.complex64)
        freqs = tuple(f.astype(np.float32) for f in self.freqs)
        if type(stamps).__module__.startswith("torch"):
            import torch as xp

            kern, freqs = xp.as_tensor(kern), tuple(xp.as_tensor(f) for f in freqs)
        else:  # numpy constants are safe to close over inside jit traces
            import jax.numpy as xp
        return render(stamps, fluxes, positions, kern, freqs, self.image_shape, xp)
