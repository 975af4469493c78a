"""Tests of probdeblend.measure against independent references (GalSim profiles and HSM,
analytic overlaps, hand-written formulas)."""

from __future__ import annotations

import galsim
import numpy as np
import pytest

from probdeblend import measure

SCALE = 0.2  # arcsec / pixel
N = 64

# (|g|, position angle in degrees) -> (g1, g2); covers |g| up to 0.6 and all quadrants
_POLAR = [(0.0, 0.0), (0.05, 10.0), (0.2, 0.0), (0.3, 90.0), (0.3, 45.0), (0.45, 135.0),
          (0.5, 22.5), (0.6, 0.0), (0.6, 60.0), (0.6, 160.0)]
SHEARS = np.array([(g * np.cos(2 * np.deg2rad(a)), g * np.sin(2 * np.deg2rad(a)))
                   for g, a in _POLAR])


def _draw(prof, shears=SHEARS, method="no_pixel", nx=N, ny=N):
    return np.stack([
        prof.shear(g1=g1, g2=g2).drawImage(nx=nx, ny=ny, scale=SCALE, method=method).array
        for g1, g2 in shears
    ]).astype(np.float64)


def _hsm(images):
    """galsim.hsm.FindAdaptiveMom on each image, 0-based pixel coordinates."""
    return [galsim.hsm.FindAdaptiveMom(galsim.Image(im, xmin=0, ymin=0)) for im in images]


@pytest.fixture(scope="module")
def gaussians():
    return _draw(galsim.Gaussian(half_light_radius=0.5))


@pytest.fixture(scope="module")
def exponentials():
    # hlr = 5 px: at hlr = 2.5 px the exponential's cusp is undersampled and the *drawn*
    # image's shape differs from g by ~0.016 (no_pixel) / ~0.03 (pixel-convolved), while HSM
    # agrees with measure to 1e-7 on those images (a pixelisation effect, not a measurement one)
    return _draw(galsim.Exponential(half_light_radius=1.0))


# --------------------------------------------------------------------------------------------
# ellipticity and moments
# --------------------------------------------------------------------------------------------
def test_adaptive_ellipticity_recovers_gaussian_shear(gaussians):
    g1, g2 = measure.ellipticity(gaussians, "adaptive")
    np.testing.assert_allclose(np.c_[g1, g2], SHEARS, atol=1e-3, rtol=0)


def test_unweighted_ellipticity_recovers_gaussian_shear(gaussians):
    g1, g2 = measure.ellipticity(gaussians, "unweighted")
    np.testing.assert_allclose(np.c_[g1, g2], SHEARS, atol=1e-3, rtol=0)


def test_adaptive_ellipticity_recovers_exponential_shear(exponentials):
    g1, g2 = measure.ellipticity(exponentials, "adaptive")
    np.testing.assert_allclose(np.c_[g1, g2], SHEARS, atol=2e-3, rtol=0)


def test_gaussian_moments_are_its_covariance():
    sigma = 2.0  # pixels
    img = galsim.Gaussian(sigma=sigma * SCALE).drawImage(nx=N, ny=N, scale=SCALE,
                                                         method="no_pixel").array
    for ws in (None, "adaptive"):
        m = measure.moments(img, weight_sigma=ws)
        np.testing.assert_allclose([m.Q11, m.Q22, m.Q12], [sigma**2, sigma**2, 0.0],
                                   atol=1e-4)
        np.testing.assert_allclose(m.sigma, sigma, rtol=1e-4)
        assert m.converged
    # fixed weight: raw weighted moments of a Gaussian are (1/s^2 + 1/w^2)^-1
    w = 3.0
    m = measure.moments(img, weight_sigma=w)
    np.testing.assert_allclose(m.Q11, 1 / (1 / sigma**2 + 1 / w**2), rtol=1e-4)
    np.testing.assert_allclose(m.flux, img.sum())


@pytest.mark.parametrize(
    "prof",
    [galsim.Gaussian(half_light_radius=0.5), galsim.Exponential(half_light_radius=0.5),
     galsim.Sersic(n=2.5, half_light_radius=1.0)],
    ids=["gaussian", "exponential", "sersic2.5"],
)
def test_adaptive_moments_match_galsim_hsm(prof):
    images = _draw(prof, SHEARS[::2], method="auto")
    m = measure.moments(images, weight_sigma="adaptive")
    g1, g2 = m.g
    ref = _hsm(images)
    assert m.converged.all()
    np.testing.assert_allclose(g1, [r.observed_shape.g1 for r in ref], atol=1e-4)
    np.testing.assert_allclose(g2, [r.observed_shape.g2 for r in ref], atol=1e-4)
    np.testing.assert_allclose(m.sigma, [r.moments_sigma for r in ref], rtol=1e-3)
    np.testing.assert_allclose(m.x, [r.moments_centroid.x for r in ref], atol=1e-3)
    np.testing.assert_allclose(m.y, [r.moments_centroid.y for r in ref], atol=1e-3)


def test_adaptive_moments_match_hsm_on_noisy_image():
    rng = np.random.default_rng(1)
    img = galsim.Exponential(half_light_radius=0.6, flux=3000.0).shear(g1=0.2, g2=-0.1)
    img = img.drawImage(nx=N, ny=N, scale=SCALE).array + rng.normal(0, 1.0, (N, N))
    m = measure.moments(img, "adaptive")
    ref = _hsm([img])[0]
    np.testing.assert_allclose([m.g[0], m.g[1]],
                               [ref.observed_shape.g1, ref.observed_shape.g2], atol=1e-3)
    np.testing.assert_allclose(m.sigma, ref.moments_sigma, rtol=1e-3)


@pytest.mark.parametrize("nx, ny", [(64, 64), (65, 63), (48, 51)])
def test_centroid_recovers_galsim_shift(nx, ny):
    shifts = [(0.0, 0.0), (0.37, -0.21), (-1.13, 0.52), (0.1, 1.9)]  # arcsec
    prof = galsim.Gaussian(half_light_radius=0.5).shear(g1=0.2, g2=0.3)
    images = np.stack([
        prof.shift(dx, dy).drawImage(nx=nx, ny=ny, scale=SCALE, method="no_pixel").array
        for dx, dy in shifts
    ])
    true_x = (nx - 1) / 2 + np.array([s[0] for s in shifts]) / SCALE
    true_y = (ny - 1) / 2 + np.array([s[1] for s in shifts]) / SCALE
    for ws in (None, "adaptive"):
        m = measure.moments(images, weight_sigma=ws)
        np.testing.assert_allclose(m.x, true_x, atol=1e-4)
        np.testing.assert_allclose(m.y, true_y, atol=1e-4)
    # and HSM, in the same 0-based convention, agrees
    ref = _hsm(images)
    np.testing.assert_allclose(true_x, [r.moments_centroid.x for r in ref], atol=1e-4)
    np.testing.assert_allclose(true_y, [r.moments_centroid.y for r in ref], atol=1e-4)


def test_ellipticity_conversions_match_galsim_shear():
    for g1, g2 in SHEARS:
        s = galsim.Shear(g1=g1, g2=g2)
        np.testing.assert_allclose(measure.shear_to_distortion(g1, g2), (s.e1, s.e2),
                                   atol=1e-12)
        np.testing.assert_allclose(measure.distortion_to_shear(s.e1, s.e2), (g1, g2),
                                   atol=1e-12)
        # moments of a sheared round Gaussian: Q = sigma^2 (S S^T), S the shear matrix
        mat = s.getMatrix()
        q = mat @ mat.T
        np.testing.assert_allclose(measure.shear_from_moments(q[0, 0], q[1, 1], q[0, 1]),
                                   (g1, g2), atol=1e-12)


def test_moments_failure_is_flagged_not_silent():
    images = np.zeros((3, 20, 20))
    images[0, 10, 10] = 1.0
    images[0, 10, 11] = 0.5
    images[0, 11, 10] = 0.5
    images[1] = -1.0
    images[2] = galsim.Gaussian(sigma=0.5).drawImage(nx=20, ny=20, scale=SCALE).array
    with pytest.warns(RuntimeWarning, match="adaptive moments"):
        m = measure.moments(images, "adaptive")
    assert not m.converged[1] and np.isnan(m.Q11[1])
    assert m.converged[2] and np.isfinite(m.Q11[2])
    with pytest.warns(RuntimeWarning, match="non-positive total flux"):
        m = measure.moments(images, None)
    assert np.isnan(m.x[1]) and not m.converged[1]


def test_moments_unweighted_center_sets_origin():
    img = np.zeros((9, 9))
    img[4, 6] = 1.0  # a point at x=6, y=4
    m = measure.moments(img, center=(4.0, 4.0))
    assert (m.x, m.y) == (6.0, 4.0)
    np.testing.assert_allclose([m.Q11, m.Q22, m.Q12], [4.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------
# size and flux
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prof", [galsim.Gaussian(half_light_radius=0.5), galsim.Exponential(half_light_radius=0.5),
             galsim.Gaussian(half_light_radius=1.2)],
    ids=["gaussian", "exponential", "big-gaussian"],
)
def test_half_light_radius_matches_galsim(prof):
    img = prof.drawImage(nx=N, ny=N, scale=SCALE).array  # pixel-convolved, as observed
    hlr = measure.half_light_radius(img) * SCALE
    np.testing.assert_allclose(hlr, prof.half_light_radius, rtol=0.03)
    # off-centre object with an explicit centre gives the same
    img2 = prof.shift(0.6, -0.4).drawImage(nx=N, ny=N, scale=SCALE).array
    c = ((N - 1) / 2 + 3.0, (N - 1) / 2 - 2.0)
    np.testing.assert_allclose(measure.half_light_radius(img2, center=c), hlr / SCALE,
                               rtol=1e-3)


def test_half_light_radius_of_uniform_disc():
    # a uniform disc of radius R has hlr R / sqrt(2)
    R = 12.0
    y, x = np.mgrid[0:64, 0:64]
    sub = 8  # supersample the disc edge
    yy, xx = np.mgrid[0:64 * sub, 0:64 * sub]
    fine = (((xx + 0.5) / sub - 0.5 - 31.5) ** 2 + ((yy + 0.5) / sub - 0.5 - 31.5) ** 2) < R**2
    img = fine.reshape(64, sub, 64, sub).mean(axis=(1, 3))
    np.testing.assert_allclose(measure.half_light_radius(img), R / np.sqrt(2), rtol=5e-3)


def test_flux_is_pixel_sum():
    img = galsim.Exponential(half_light_radius=0.5, flux=1234.0).drawImage(
        nx=N, ny=N, scale=SCALE).array
    np.testing.assert_allclose(measure.flux(img), 1234.0, rtol=2e-3)  # tails beyond the stamp
    np.testing.assert_allclose(measure.flux(np.stack([img, 2 * img])),
                               [img.sum(dtype=float), 2 * img.sum(dtype=float)])


# --------------------------------------------------------------------------------------------
# blendedness
# --------------------------------------------------------------------------------------------
def _gauss_image(sigma_arcsec, dx=0.0, dy=0.0, n=96, flux=1.0):
    return galsim.Gaussian(sigma=sigma_arcsec, flux=flux).shift(dx, dy).drawImage(
        nx=n, ny=n, scale=SCALE, method="no_pixel").array.astype(np.float64)


def test_blendedness_isolated_is_zero():
    t = _gauss_image(0.4)
    b_tot, b_cl = measure.blendedness(t, np.empty((0,) + t.shape))
    assert b_tot == 0.0 and b_cl == 0.0
    b_tot, b_cl = measure.blendedness(t, np.zeros((2,) + t.shape))
    assert b_tot == 0.0 and b_cl == 0.0


def test_blendedness_far_apart_and_on_top():
    t = _gauss_image(0.3, -5.0, 0.0)
    far = _gauss_image(0.3, 5.0, 0.0)
    b_tot, b_cl = measure.blendedness(t, far[None])
    assert b_tot < 1e-10 and b_cl < 1e-10
    b_tot, b_cl = measure.blendedness(t, t[None])
    np.testing.assert_allclose([b_tot, b_cl], [0.5, 0.5], atol=1e-12)


@pytest.mark.parametrize("d", [0.2, 0.5, 0.8, 1.2])
def test_blendedness_two_gaussians_analytic(d):
    # equal round Gaussians of width s at separation d: S_t.S_n / S_t.S_t = exp(-d^2 / 4 s^2)
    s = 0.4
    t = _gauss_image(s, -d / 2, 0.0)
    n = _gauss_image(s, d / 2, 0.0)
    overlap = np.exp(-(d**2) / (4 * s**2))
    expected = 1 - 1 / (1 + overlap)
    b_tot, b_cl = measure.blendedness(t, n[None])
    np.testing.assert_allclose([b_tot, b_cl], [expected, expected], atol=1e-3)


def test_blendedness_total_and_closest_with_several_neighbours():
    s = 0.4
    t = _gauss_image(s)
    seps = [(0.5, 0.0), (0.0, -1.0), (1.5, 1.5)]
    neigh = np.stack([_gauss_image(s, dx, dy, flux=2.0) for dx, dy in seps])
    ov = np.array([2 * np.exp(-(dx**2 + dy**2) / (4 * s**2)) for dx, dy in seps])
    b_tot, b_cl = measure.blendedness(t, neigh)
    np.testing.assert_allclose(b_tot, 1 - 1 / (1 + ov.sum()), atol=1e-3)
    np.testing.assert_allclose(b_cl, 1 - 1 / (1 + ov.max()), atol=1e-3)
    assert b_tot > b_cl
    # order of neighbours does not matter
    np.testing.assert_allclose(measure.blendedness(t, neigh[::-1]), (b_tot, b_cl))


def test_blendedness_batch_and_undefined_target():
    t = np.stack([_gauss_image(0.4), _gauss_image(0.4, 0.3), np.zeros((96, 96))])
    neigh = np.stack([np.stack([_gauss_image(0.4, 0.5), _gauss_image(0.4, -2.0)])] * 3)
    b_tot, b_cl = measure.blendedness(t, neigh)
    assert b_tot.shape == (3,) and b_cl.shape == (3,)
    for i in range(2):
        np.testing.assert_allclose(measure.blendedness(t[i], neigh[i]), (b_tot[i], b_cl[i]))
    assert np.isnan(b_tot[2]) and np.isnan(b_cl[2])
    with pytest.raises(ValueError, match="same pixel grid"):
        measure.blendedness(t, neigh[..., :-1])
    with pytest.raises(ValueError, match="n_neigh"):
        measure.blendedness(t[0], t[1])


# --------------------------------------------------------------------------------------------
# SNR
# --------------------------------------------------------------------------------------------
def test_snr_hand_formula_and_limits():
    s = np.array([[0.0, 1.0, 4.0], [2.0, 9.0, 0.5]])
    sky = 3.0
    expected = np.sqrt(sum(v * v / (v + sky) for v in s.ravel()))
    np.testing.assert_allclose(measure.snr(s, sky), expected, rtol=1e-12)
    # no sky: SNR^2 = total electrons, so doubling the flux doubles SNR^2
    np.testing.assert_allclose(measure.snr(s, 0.0) ** 2, s.sum())
    np.testing.assert_allclose(measure.snr(2 * s, 0.0) ** 2, 2 * s.sum())
    # sky-dominated: SNR = sqrt(sum S^2 / B), linear in flux
    big = 1e8
    np.testing.assert_allclose(measure.snr(s, big), np.sqrt((s**2).sum() / big), rtol=1e-6)
    np.testing.assert_allclose(measure.snr(2 * s, big) / measure.snr(s, big), 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="sky_level"):
        measure.snr(s, -1.0)


def test_snr_per_band_sky_broadcasts():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 10, size=(4, 3, 8, 8))  # (batch, band, y, x)
    sky = np.array([1.0, 10.0, 100.0])
    out = measure.snr(img, sky)
    assert out.shape == (4, 3)
    for b in range(3):
        np.testing.assert_allclose(out[:, b], measure.snr(img[:, b], sky[b]))


# --------------------------------------------------------------------------------------------
# image metrics
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def galaxy_pair():
    rng = np.random.default_rng(42)
    b = galsim.Exponential(half_light_radius=0.6, flux=1000.0).shear(g1=0.2, g2=0.1)
    b = b.drawImage(nx=48, ny=48, scale=SCALE).array.astype(np.float64)
    return b, rng


def test_mse_and_psnr_by_hand(galaxy_pair):
    b, _ = galaxy_pair
    a = b + 0.01 * (b.max() - b.min())
    np.testing.assert_allclose(measure.mse(a, b), (0.01 * (b.max() - b.min())) ** 2)
    np.testing.assert_allclose(measure.psnr(a, b), 40.0)  # 10 log10(1 / 1e-4)
    np.testing.assert_allclose(measure.psnr(a, b, data_range=2 * (b.max() - b.min())),
                               40.0 + 20 * np.log10(2))
    assert measure.psnr(b, b) == np.inf
    with pytest.raises(ValueError, match="constant"):
        measure.psnr(a, np.ones_like(b))


def test_ssim_properties(galaxy_pair):
    b, rng = galaxy_pair
    np.testing.assert_allclose(measure.ssim(b, b), 1.0, atol=1e-12)
    scale = b.max()
    noisy = [b + rng.normal(0, f * scale, b.shape) for f in (0.01, 0.05, 0.2)]
    vals = [measure.ssim(x, b) for x in noisy]
    assert 1.0 > vals[0] > vals[1] > vals[2] > -1.0
    # symmetric for a fixed data range
    L = b.max() - b.min()
    np.testing.assert_allclose(measure.ssim(noisy[1], b, data_range=L),
                               measure.ssim(b, noisy[1], data_range=L), rtol=1e-12)
    # constant images: only the luminance term survives, (2 ab + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * 1.0) ** 2
    np.testing.assert_allclose(
        measure.ssim(np.full((16, 16), 0.3), np.full((16, 16), 0.5), data_range=1.0),
        (2 * 0.3 * 0.5 + c1) / (0.3**2 + 0.5**2 + c1), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        measure.ssim(b[:8, :8], b[:8, :8])


def test_ssim_matches_direct_window_sum():
    # independent of scipy.ndimage: an explicit, normalised 11x11 Gaussian window (sigma 1.5,
    # radius 5) summed at every pixel whose window fits in the image, i.e. the pixels SSIM
    # averages over
    rng = np.random.default_rng(7)
    b = rng.uniform(0, 1, (2, 18, 21))
    a = b + rng.normal(0, 0.1, b.shape)
    k1d = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    win = np.outer(k1d, k1d) / k1d.sum() ** 2
    expected = []
    for x, y in zip(a, b, strict=True):
        L = y.max() - y.min()
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        vals = []
        for j in range(5, y.shape[0] - 5):
            for i in range(5, y.shape[1] - 5):
                px, py = x[j - 5:j + 6, i - 5:i + 6], y[j - 5:j + 6, i - 5:i + 6]
                mx, my = (win * px).sum(), (win * py).sum()
                vx = (win * (px - mx) ** 2).sum()
                vy = (win * (py - my) ** 2).sum()
                vxy = (win * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * vxy + c2)
                            / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        expected.append(np.mean(vals))
    np.testing.assert_allclose(measure.ssim(a, b), expected, rtol=1e-10)


def test_ssim_matches_skimage_if_installed(galaxy_pair):
    metrics = pytest.importorskip("skimage.metrics")
    b, rng = galaxy_pair
    a = b + rng.normal(0, 0.05 * b.max(), b.shape)
    L = b.max() - b.min()
    ref = metrics.structural_similarity(a, b, data_range=L, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    np.testing.assert_allclose(measure.ssim(a, b), ref, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# batch shapes and input checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_batch_shapes(batch, gaussians):
    rng = np.random.default_rng(3)
    k = int(np.prod(batch)) if batch else 1
    imgs = gaussians[:k].reshape(batch + (N, N)) * 100.0
    ref = (imgs + rng.normal(0, 0.5, imgs.shape)).reshape(batch + (N, N))
    m = measure.moments(imgs, "adaptive")
    for v in (m.flux, m.x, m.y, m.Q11, m.Q22, m.Q12, m.converged, m.n_iter):
        assert np.shape(v) == batch
    for out in (*measure.ellipticity(imgs), *measure.ellipticity(imgs, "unweighted"),
                measure.half_light_radius(imgs), measure.flux(imgs), measure.snr(imgs, 10.0),
                measure.mse(imgs, ref), measure.psnr(imgs, ref), measure.ssim(imgs, ref)):
        assert np.shape(out) == batch
    neigh = np.stack([np.roll(imgs, 5, axis=-1), np.roll(imgs, -7, axis=-2)], axis=-3)
    for out in measure.blendedness(imgs, neigh):
        assert np.shape(out) == batch
    # batched results equal one-at-a-time results
    flat = imgs.reshape((-1, N, N))
    g1 = np.atleast_1d(measure.ellipticity(imgs)[0]).ravel()
    for i in range(flat.shape[0]):
        np.testing.assert_allclose(g1[i], measure.ellipticity(flat[i])[0], atol=1e-12)


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        measure.moments(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="ny, nx"):
        measure.flux(np.ones(5))
    with pytest.raises(TypeError, match="real-valued"):
        measure.flux(np.ones((4, 4), dtype=complex))
    with pytest.raises(ValueError, match="method"):
        measure.ellipticity(np.ones((8, 8)), method="ksb")
    with pytest.raises(ValueError, match="weight_sigma"):
        measure.moments(np.ones((8, 8)), weight_sigma="hsm")
    with pytest.raises(ValueError, match="center"):
        measure.moments(np.ones((2, 8, 8)), "adaptive", center=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="same image size"):
        measure.mse(np.ones((8, 8)), np.ones((8, 9)))


# --------------------------------------------------------------------------------------------
# fast PSF-corrected shapes in torch (shape_torch)
# --------------------------------------------------------------------------------------------
PSF_FWHM = 0.4  # arcsec: the lsst priors' Gaussian model PSF
PSF_SIGMA_PIX = PSF_FWHM / 2.35482 / SCALE
STAMP = 48


def _bulge_disk_set(n=24, seed=3):
    """Noiseless bulge + disk galaxies with known intrinsic shear g, convolved with the Gaussian
    model PSF, drawn at the prior's pixel scale on 48x48 stamps (pixel response included)."""
    rng = np.random.default_rng(seed)
    psf = galsim.Gaussian(fwhm=PSF_FWHM)
    images, shears = [], []
    for _ in range(n):
        bt = rng.uniform(0.0, 0.8)
        gal = galsim.Add([
            galsim.DeVaucouleurs(half_light_radius=rng.uniform(0.15, 0.5), flux=bt),
            galsim.Exponential(half_light_radius=rng.uniform(0.35, 1.0), flux=1.0 - bt)])
        g = rng.normal(0.0, 0.25, 2)
        while np.hypot(*g) > 0.6:
            g = rng.normal(0.0, 0.25, 2)
        off = rng.uniform(-0.5, 0.5, 2) * SCALE
        img = galsim.Convolve(gal.shear(g1=g[0], g2=g[1]).shift(*off), psf).drawImage(
            nx=STAMP, ny=STAMP, scale=SCALE).array
        images.append(img)
        shears.append(g)
    return np.array(images, dtype=np.float64), np.array(shears)


@pytest.fixture(scope="module")
def bulge_disks():
    return _bulge_disk_set()


@pytest.fixture(scope="module")
def model_psf_image():
    return galsim.Gaussian(fwhm=PSF_FWHM).drawImage(nx=25, ny=25, scale=SCALE).array


def test_torch_adaptive_moments_match_hsm(bulge_disks):
    torch = pytest.importorskip("torch")
    images, _ = bulge_disks
    m = measure.adaptive_moments_torch(torch.from_numpy(images))
    ref = _hsm(images)
    assert bool(m.ok.all())
    sigma = ((m.Mxx * m.Myy - m.Mxy**2) ** 0.25).numpy()
    t = (m.Mxx + m.Myy).numpy()
    e = np.c_[(m.Mxx - m.Myy).numpy() / t, 2 * m.Mxy.numpy() / t]
    np.testing.assert_allclose(sigma, [r.moments_sigma for r in ref], rtol=1e-4)
    np.testing.assert_allclose(e, [(r.observed_shape.e1, r.observed_shape.e2) for r in ref],
                               atol=1e-4)
    np.testing.assert_allclose(m.x.numpy(), [r.moments_centroid.x for r in ref], atol=1e-3)
    np.testing.assert_allclose(m.y.numpy(), [r.moments_centroid.y for r in ref], atol=1e-3)
    np.testing.assert_allclose(m.rho4.numpy(), [r.moments_rho4 for r in ref], atol=1e-3)
    np.testing.assert_allclose(2 * m.amp.numpy(), [r.moments_amp for r in ref], rtol=1e-4)
    # the numpy implementation converges to the same fixed point
    mn = measure.moments(images, weight_sigma="adaptive")
    np.testing.assert_allclose(m.Mxx.numpy(), mn.Q11, rtol=1e-5)
    np.testing.assert_allclose(m.Mxy.numpy(), mn.Q12, atol=1e-5)


def test_gaussian_psf_moments_match_hsm(model_psf_image):
    t, a4 = measure.gaussian_psf_moments(PSF_SIGMA_PIX)
    ref = galsim.hsm.FindAdaptiveMom(galsim.Image(model_psf_image))
    # GalSim's drawn pixel-integrated Gaussian differs from the exact erf form by ~2e-4
    np.testing.assert_allclose(t, 2 * ref.moments_sigma**2, rtol=5e-4)
    np.testing.assert_allclose(a4, ref.moments_rho4 / 2 - 1, atol=1e-4)


def test_shape_torch_bj_matches_hsm_bj(bulge_disks, model_psf_image):
    torch = pytest.importorskip("torch")
    images, _ = bulge_disks
    g1, g2, ok = measure.shape_torch(torch.from_numpy(images), PSF_SIGMA_PIX, correction="bj")
    psf = galsim.Image(model_psf_image)
    ref = [galsim.hsm.EstimateShear(galsim.Image(im), psf, shear_est="BJ") for im in images]
    r1, r2 = measure.distortion_to_shear([r.corrected_e1 for r in ref],
                                         [r.corrected_e2 for r in ref])
    assert bool(ok.all())
    np.testing.assert_allclose(np.c_[g1, g2], np.c_[r1, r2], atol=1e-3)


def test_shape_torch_recovers_true_shear(bulge_disks, model_psf_image):
    """Default correction on noiseless bulge + disks: each g within 0.04 of the truth, and the
    linear fit g_meas = (1 + m) g_true + c has |m| < 0.03, |c| < 2e-3 (measured: m ~ +0.007,
    max error 0.025). For comparison REGAUSS, on the same images, is within 0.06."""
    torch = pytest.importorskip("torch")
    images, true = bulge_disks
    g1, g2, ok = measure.shape_torch(torch.from_numpy(images), PSF_SIGMA_PIX)
    g = np.c_[g1, g2]
    assert bool(ok.all())
    np.testing.assert_allclose(g, true, atol=0.04)
    for k in range(2):
        m, c = np.polyfit(true[:, k], g[:, k], 1)
        assert abs(m - 1) < 0.03 and abs(c) < 2e-3, (k, m, c)
    rg = np.c_[measure.psf_corrected_shape(images, model_psf_image, SCALE)]
    np.testing.assert_allclose(rg, true, atol=0.06)


def test_shape_torch_gaussian_galaxies_exact():
    """Gaussian galaxy x Gaussian PSF: moment subtraction is exact but for the pixel response
    (the pixel-integrated PSF is not Gaussian): |g| is 0.8 % low at galaxy sigma = 1.5 px."""
    torch = pytest.importorskip("torch")
    gal = galsim.Gaussian(sigma=0.3)
    psf = galsim.Gaussian(fwhm=PSF_FWHM)
    imgs = np.stack([galsim.Convolve(gal.shear(g1=a, g2=b), psf).drawImage(
        nx=STAMP, ny=STAMP, scale=SCALE).array for a, b in SHEARS])
    for corr in ("gaussian", "bj-gaussian-psf"):
        g1, g2, ok = measure.shape_torch(torch.from_numpy(imgs), PSF_SIGMA_PIX,
                                         correction=corr)
        assert bool(ok.all())
        np.testing.assert_allclose(np.c_[g1, g2], SHEARS, rtol=0.012, atol=2e-4, err_msg=corr)


def test_shape_torch_numpy_wrapper_identical_and_float32(bulge_disks):
    torch = pytest.importorskip("torch")
    images, _ = bulge_disks
    g1, g2, ok = measure.shape_torch(torch.from_numpy(images), PSF_SIGMA_PIX)
    n1, n2 = measure.psf_corrected_shape_fast(images, PSF_SIGMA_PIX)
    assert isinstance(n1, np.ndarray) and n1.dtype == np.float64
    np.testing.assert_array_equal(n1, g1.numpy())
    np.testing.assert_array_equal(n2, g2.numpy())
    # float32 (the GPU path's dtype) agrees to well below the estimator's bias
    f1, f2, fok = measure.shape_torch(torch.from_numpy(images).float(), PSF_SIGMA_PIX)
    assert f1.dtype == torch.float32 and bool(fok.all())
    np.testing.assert_allclose(f1.numpy(), n1, atol=2e-4)
    np.testing.assert_allclose(f2.numpy(), n2, atol=2e-4)


def test_shape_torch_batch_of_4096_with_failures(bulge_disks):
    """4096 stamps in one call (batch shape kept), with failures flagged, not propagated."""
    torch = pytest.importorskip("torch")
    images, _ = bulge_disks
    base = torch.from_numpy(images).float()
    ref1, ref2, _ = measure.shape_torch(base, PSF_SIGMA_PIX)
    reps = 4096 // len(images) + 1
    big = base.repeat(reps, 1, 1)[:4096].clone()
    # a star on a pixel centre (on a pixel corner the undersampled PSF's adaptive moments are
    # 4 % larger, and it would be measured as a barely resolved round object, g ~ 0)
    psf = torch.from_numpy(galsim.Gaussian(fwhm=PSF_FWHM).shift(0.5 * SCALE, 0.5 * SCALE)
                           .drawImage(nx=STAMP, ny=STAMP, scale=SCALE).array).float()
    big[5] = 0.0  # no flux
    big[6] = -big[6]  # negative flux
    big[7] = psf  # a star: unresolved
    big[8] = float("nan")  # corrupt stamps stay in their own entries
    big[9, 3, 4] = float("inf")
    big = big.reshape(64, 64, STAMP, STAMP)
    g1, g2, ok = measure.shape_torch(big, PSF_SIGMA_PIX)
    assert g1.shape == g2.shape == ok.shape == (64, 64)
    g1, g2, ok = g1.reshape(-1), g2.reshape(-1), ok.reshape(-1)
    assert not ok[5:10].any()
    assert torch.isnan(g1[5:10]).all() and torch.isnan(g2[5:10]).all()
    good = torch.ones(4096, dtype=torch.bool)
    good[5:10] = False
    assert bool(ok[good].all())
    idx = torch.arange(4096) % len(images)
    np.testing.assert_allclose(g1[good].numpy(), ref1[idx[good]].numpy(), atol=1e-6)
    np.testing.assert_allclose(g2[good].numpy(), ref2[idx[good]].numpy(), atol=1e-6)


def test_shape_torch_on_cuda_matches_cpu(bulge_disks):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images, _ = bulge_disks
    ref1, ref2, ref_ok = measure.shape_torch(torch.from_numpy(images), PSF_SIGMA_PIX)
    for dt, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        g1, g2, ok = measure.shape_torch(torch.from_numpy(images).to("cuda", dt), PSF_SIGMA_PIX)
        assert g1.device.type == "cuda" and g1.dtype == dt
        assert torch.equal(ok.cpu(), ref_ok)
        np.testing.assert_allclose(g1.cpu().double().numpy(), ref1.numpy(), atol=tol)
        np.testing.assert_allclose(g2.cpu().double().numpy(), ref2.numpy(), atol=tol)
    r = measure.shear_response_stamps(torch.from_numpy(images).cuda(), PSF_SIGMA_PIX)
    r_cpu = measure.shear_response_stamps(torch.from_numpy(images), PSF_SIGMA_PIX)
    assert abs(r.R - r_cpu.R) < 1e-8


def test_shape_torch_input_validation():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch.Tensor"):
        measure.shape_torch(np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="correction"):
        measure.shape_torch(torch.zeros(8, 8), 1.0, correction="ksb")
    with pytest.raises(ValueError, match="psf_sigma_pix"):
        measure.shape_torch(torch.zeros(8, 8), -1.0)
    with pytest.raises(ValueError, match="shape"):
        measure.shape_torch(torch.zeros(8), 1.0)


# --------------------------------------------------------------------------------------------
# shear response (metacalibration-like, noise-free)
# --------------------------------------------------------------------------------------------
def test_shear_psf_free_matches_galsim_shear():
    """Shearing the PSF-free galaxy of a drawn stamp (PSF kept round) = drawing it sheared."""
    torch = pytest.importorskip("torch")
    psf = galsim.Gaussian(fwhm=PSF_FWHM)
    gal = galsim.Add([galsim.DeVaucouleurs(half_light_radius=0.3, flux=0.4),
                      galsim.Exponential(half_light_radius=0.7, flux=0.6)]).shear(g1=0.2,
                                                                                  g2=-0.1)
    base = galsim.Convolve(gal, psf).drawImage(nx=STAMP, ny=STAMP, scale=SCALE).array
    for g in [(0.02, 0.0), (0.0, -0.02), (-0.05, 0.03)]:
        ref = galsim.Convolve(gal.shear(g1=g[0], g2=g[1]), psf).drawImage(
            nx=STAMP, ny=STAMP, scale=SCALE).array
        out = measure.shear_psf_free(torch.from_numpy(base), g, PSF_SIGMA_PIX).numpy()
        assert np.abs(out - ref).max() < 2e-3 * ref.max()
        g1, g2, _ = measure.shape_torch(torch.from_numpy(np.stack([ref, out])), PSF_SIGMA_PIX)
        np.testing.assert_allclose(g1[1], g1[0], atol=5e-5)
        np.testing.assert_allclose(g2[1], g2[0], atol=5e-5)


def test_shear_response_stamps_gaussian_and_bulge_disk(bulge_disks):
    torch = pytest.importorskip("torch")
    # Gaussian galaxies, moment subtraction: R = 1 up to the pixel's ~1 %. The set is closed
    # under a 45-degree rotation (g -> i g), so <g^2> = 0 and the response matrix is diagonal
    # (a single elliptical galaxy's is not: shears compose non-linearly)
    psf = galsim.Gaussian(fwhm=PSF_FWHM)
    shears = np.concatenate([SHEARS, np.c_[-SHEARS[:, 1], SHEARS[:, 0]]])
    gauss = np.stack([galsim.Convolve(galsim.Gaussian(sigma=0.4).shear(g1=a, g2=b), psf)
                      .drawImage(nx=STAMP, ny=STAMP, scale=SCALE).array for a, b in shears])
    r = measure.shear_response_stamps(torch.from_numpy(gauss), PSF_SIGMA_PIX,
                                      correction="gaussian")
    assert r.n_ok == len(shears) and abs(r.R - 1) < 0.015, r
    assert abs(r.R12) < 2e-3 and abs(r.R21) < 2e-3, r
    # bulge + disks: the finite-difference response predicts the slope of g_meas vs g_true
    images, true = bulge_disks
    r = measure.shear_response_stamps(torch.from_numpy(images), PSF_SIGMA_PIX)
    g1, g2, _ = measure.shape_torch(torch.from_numpy(images), PSF_SIGMA_PIX)
    slope = np.mean([np.polyfit(true[:, 0], g1, 1)[0], np.polyfit(true[:, 1], g2, 1)[0]])
    assert abs(r.R - slope) < 0.02, (r.R, slope)
    assert float(r) == r.R and r.m == r.R - 1


def test_shear_response_on_prior():
    torch = pytest.importorskip("torch")
    import probdeblend as pb

    prior = pb.load_prior("lsst-vae")
    state = torch.random.get_rng_state()
    r = measure.shear_response(prior, n=64, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert r.n == 64 and r.n_ok >= 56
    assert 0.95 < r.R < 1.06 and r.R_err < 0.02  # measured on n = 2000: R = 1.005 +- 0.0014
    assert measure.shear_response(prior, n=64, seed=1) == r  # reproducible
    with pytest.raises(ValueError, match="delta"):
        measure.shear_response(prior, n=8, delta=0.5)


def test_half_eta_round_trip_and_unit_disk():
    """shear_to_half_eta / half_eta_to_shear are inverses on |g| < 1, keep the direction, and
    any finite half-eta maps inside the unit disk (so an additive shape error stays an
    ellipse); |eta / 2| = atanh|g|."""
    rng = np.random.default_rng(0)
    g = rng.uniform(-0.7, 0.7, (500, 2))
    g = g[np.hypot(g[:, 0], g[:, 1]) < 0.99]
    h = measure.shear_to_half_eta(g)
    np.testing.assert_allclose(measure.half_eta_to_shear(h), g, atol=1e-12)
    np.testing.assert_allclose(np.hypot(*h.T), np.arctanh(np.hypot(*g.T)), rtol=1e-12)
    assert np.all(np.sum(h * g, -1) >= 0)
    far = measure.half_eta_to_shear(rng.normal(0, 5.0, (500, 2)))
    assert np.all(np.hypot(*far.T) < 1.0)
