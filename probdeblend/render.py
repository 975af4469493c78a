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

from .errors import ArgumentError, InvalidPSFError

__all__ = ["SceneRenderer", "render", "shear_stamps", "difference_kernel_ft", "fft_size"]

#: Largest |PSF_b / PSF_model| allowed in Fourier space before the model PSF counts as too wide.
_MAX_KERNEL_GAIN = 1.05


def fft_size(n: int, even: bool = False) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast FFT length);
    ``even``: the smallest even one (what :func:`render` needs along x, whose real-FFT grid
    width it infers as ``2 * (len(fx) - 1)``)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1 and (m % 2 == 0 or not even):
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
        Observed PSF images (odd size, centred), on the scene's pixel grid; unit sum, or the
        fraction of a point source's flux the image holds (``Scene.unit_flux_psf``), which
        scales the kernel.
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


def _periodic_sinc(t, n: int, xp):
    """Band-limited interpolation kernel of a period-``n`` sampled signal (``n`` even): the
    value at offset ``t`` (pixels) of a unit sample, ``sin(pi t) / (n tan(pi t / n))``."""
    small = xp.abs(t) < 1e-3
    ts = xp.where(small, 1.0, t)
    # second-order Taylor series near 0, so that first *and second* derivatives (Hessians for
    # the Laplace approximation) are right at integer offsets, e.g. at g = 0 exactly
    taylor = 1.0 - (math.pi**2 / 6.0) * (1.0 - 1.0 / n**2) * t**2
    return xp.where(small, taylor, xp.sin(math.pi * ts) / (n * xp.tan(math.pi * ts / n)))


def _resample(stamps, positions, axis: int, xp):
    """Band-limited resampling of the last two axes along ``axis`` (-1: x, -2: y).

    ``positions`` (lines, n) or (n,): pixel index at which each output pixel samples its line;
    for ``axis=-1`` a line is a row (index y), for ``axis=-2`` a column (index x).
    """
    n = stamps.shape[-1]
    j = xp.arange(n, dtype=stamps.dtype)
    w = _periodic_sinc(positions[..., :, None] - j, n, xp)   # (lines?, out, in)
    if axis == -1:
        return xp.einsum("yij,...yj->...yi", w, stamps) if w.ndim == 3 else stamps @ w.T
    return xp.einsum("xij,...jx->...ix", w, stamps) if w.ndim == 3 else w @ stamps


def shear_stamps(stamps, shear, xp):
    """Apply a constant reduced shear ``g = (g1, g2)`` to model-frame stamps about their centre.

    The sheared image is ``I'(x) = I(S^{-1} x)`` with GalSim's shear matrix
    ``S = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - |g|^2)`` (unit determinant, so flux is kept).
    ``S^{-1} = L D U`` (lower shear, axis scaling, upper shear) gives three separable passes of
    band-limited (periodic-sinc) resampling, each exact for a band-limited periodic stamp; the
    stamps must be even-sized and their light contained (wrap-around is not treated).

    Shearing a model-frame image also shears its model PSF. The renderer undoes that in Fourier
    space with :func:`model_psf_shear_correction`; this function only moves pixels.

    Parameters
    ----------
    stamps : array (..., n, n)
    shear : array (2,)
        One (g1, g2) for every stamp.
    xp : module (``torch`` or ``jax.numpy``)
    """
    n = stamps.shape[-1]
    c = (n - 1) / 2.0
    g1, g2 = shear[..., 0], shear[..., 1]
    norm = xp.sqrt(1.0 - g1**2 - g2**2)
    a, b = (1.0 - g1) / norm, -g2 / norm          # S^{-1} = [[a, b], [b, d]], ad - b^2 = 1
    r = xp.arange(n, dtype=stamps.dtype) - c        # centred coordinates of pixel indices
    # line k samples pixel i at r_i + beta r_k (+ c): the L and U passes, with L = U^T
    sheared = r[None, :] + (b / a) * r[:, None] + c
    # pass 1 (L): h1(u, v) = I(u, v + beta u): column x samples y at v + beta u_x
    h = _resample(stamps, sheared, -2, xp)
    # pass 2 (D): h2(u, v) = h1(a u, v / a)
    h = _resample(h, a * r + c, -1, xp)
    h = _resample(h, r / a + c, -2, xp)
    # pass 3 (U): h3(u, v) = h2(u + beta v, v): row y samples x at u + beta v_y
    return _resample(h, sheared, -1, xp)


def model_psf_shear_correction(shear, freqs, model_psf_sigma: float, xp):
    """Fourier multiplier ``P_m(k) / P_m(S k)`` that restores the unsheared model PSF after
    :func:`shear_stamps` sheared it along with the galaxy.

    ``P_m`` is the pixel-integrated Gaussian model PSF (``sigma`` in pixels): a Gaussian times
    the pixel response ``sinc(k_x) sinc(k_y)``; both are restored. ``freqs`` are the (rows,
    columns) frequency arrays (cycles / pixel) of the FFT grid.
    """
    fy, fx = freqs
    g1, g2 = shear[..., 0], shear[..., 1]
    norm = xp.sqrt(1.0 - g1**2 - g2**2)
    sx = ((1 + g1) * fx + g2 * fy) / norm
    sy = (g2 * fx + (1 - g1) * fy) / norm
    k2 = fx**2 + fy**2
    gauss = xp.exp(-2 * math.pi**2 * model_psf_sigma**2 * (k2 - sx**2 - sy**2))
    return gauss * _sinc(fx, xp) * _sinc(fy, xp) / (_sinc(sx, xp) * _sinc(sy, xp))


def _sinc(k, xp):
    """sin(pi k) / (pi k), safe at 0 and differentiable."""
    small = xp.abs(k) < 1e-3
    ks = xp.where(small, 1.0, k)
    taylor = 1.0 - (math.pi * k) ** 2 / 6.0  # exact to second order (see _periodic_sinc)
    return xp.where(small, taylor, xp.sin(math.pi * ks) / (math.pi * ks))


def render(stamps, fluxes, positions, kernel_ft, freqs, image_shape, xp, shear=None,
           model_psf_sigma: float = 0.0):
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
        Spatial frequencies (cycles per pixel) of the FFT grid, rows and columns; ``FX`` must
        be even (it is inferred as ``2 * (len(fx) - 1)``; ``fft_size(n, even=True)``).
    image_shape : (int, int)
        (ny, nx) of the scene.
    xp : module
        ``torch`` or ``jax.numpy``.
    shear : array (2,), optional
        Constant reduced shear (g1, g2) applied to every PSF-free galaxy (GalSim convention),
        about each source's own centre; see :func:`shear_stamps`.
    model_psf_sigma : float
        Gaussian sigma (pixels) of the prior's model PSF; needed with ``shear``.

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
    if shear is not None:
        stamps = shear_stamps(stamps, shear, xp)
        kernel_ft = kernel_ft * model_psf_shear_correction(shear, freqs, model_psf_sigma, xp)
    # the shift's phase factorises in x and y: two small exponentials, one product
    phase = (xp.exp(-2j * math.pi * fx * dx[..., None, None])
             * xp.exp(-2j * math.pi * fy * dy[..., None, None]))
    stamp_ft = xp.fft.rfft2(stamps * fluxes[..., None, None], s=fft_shape)
    total_ft = (stamp_ft * phase[..., None, :, :]).sum(-4)  # sum over sources
    scene = xp.fft.irfft2(total_ft * kernel_ft, s=fft_shape)
    return scene[..., : image_shape[0], : image_shape[1]]


def _gaussian_sigma(psf: np.ndarray) -> float:
    """sigma (pixels) of a centred, circular Gaussian PSF image, from its second moments minus
    the pixel's 1/12 (exact for a pixel-integrated Gaussian)."""
    k = psf.shape[-1]
    r = np.arange(k) - (k - 1) / 2
    p = psf / psf.sum()
    var = float((p.sum(0) * r**2).sum() + (p.sum(1) * r**2).sum()) / 2
    return float(np.sqrt(max(var - 1 / 12, 1e-12)))


class SceneRenderer:
    """Precomputed forward model for one scene and one prior frame.

    Parameters
    ----------
    psf : array (band, k, k)
        The image of a unit-total-flux point source per band (``scene.unit_flux_psf``: the
        unit-sum PSF images times the scene's ``psf_flux_fraction``).
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
        # an even width: render() infers the real-FFT grid width from the x frequencies as
        # 2 * (len(fx) - 1); an odd one (e.g. 225 for a 128 px scene, before this was
        # enforced) shifted sources by up to ~0.5 px across the image and misplaced the
        # difference kernel (rows take any fast length)
        self.fft_shape = (fft_size(self.image_shape[0] + stamp_size + k),
                          fft_size(self.image_shape[1] + stamp_size + k, even=True))
        self.kernel_ft = difference_kernel_ft(psf, model_psf, self.fft_shape, bands)
        self.freqs = (np.fft.fftfreq(self.fft_shape[0])[:, None],
                      np.fft.rfftfreq(self.fft_shape[1])[None, :])
        self.model_psf_sigma = _gaussian_sigma(np.asarray(model_psf, dtype=np.float64))

    @classmethod
    def from_scene(cls, scene, frame) -> SceneRenderer:
        """Renderer for a :class:`~probdeblend.Scene` and a prior's model frame.

        The scene's pixel scale must equal the frame's (no resampling is done).
        """
        if not math.isclose(scene.pixel_scale, frame.pixel_scale, rel_tol=1e-6):
            raise ArgumentError(
                "scene", scene.pixel_scale,
                f"scene.pixel_scale={scene.pixel_scale} differs from the prior's model frame "
                f"pixel scale {frame.pixel_scale}; resample the scene or use a prior trained at "
                f"this pixel scale"
            )
        k = scene.psf.shape[-1]
        return cls(scene.unit_flux_psf, scene.shape, frame.psf_image(k), frame.stamp_size,
                   scene.bands)

    def __call__(self, stamps, fluxes, positions, shear=None):
        """Render with the backend of ``stamps`` (torch tensor or JAX array); see :func:`render`.
        ``shear`` (g1, g2), an array of the same backend, shears every PSF-free galaxy."""
        kern = self.kernel_ft.astype(np.complex64)
        freqs = tuple(f.astype(np.float32) for f in self.freqs)
        if type(stamps).__module__.startswith("torch"):
            import torch as xp

            kern, freqs = xp.as_tensor(kern), tuple(xp.as_tensor(f) for f in freqs)
        else:  # numpy constants are safe to close over inside jit traces
            import jax.numpy as xp
        return render(stamps, fluxes, positions, kern, freqs, self.image_shape, xp, shear=shear,
                      model_psf_sigma=self.model_psf_sigma)
