"""Tests of probdeblend.scene: validation, immutability, derived scenes and FITS I/O."""

from __future__ import annotations

import os
import pickle

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from probdeblend.errors import (
    BandMismatchError,
    CorruptFileError,
    FITSChecksumError,
    InputNotFoundError,
    InvalidDtypeError,
    InvalidImageError,
    InvalidPSFError,
    InvalidVarianceError,
    OutputExistsError,
    PositionError,
    ProbdeblendError,
    SceneError,
    UnknownBandError,
)
from probdeblend.scene import Scene

BANDS = ("g", "r", "i")
NY, NX = 32, 40
PIXEL_SCALE = 0.2


def _psf(fwhm: float = 0.8, size: int = 25) -> np.ndarray:
    img = galsim.Gaussian(fwhm=fwhm).drawImage(nx=size, ny=size, scale=PIXEL_SCALE).array
    return img / img.sum()


@pytest.fixture(scope="module")
def psf_cube() -> np.ndarray:
    return np.stack([_psf(fwhm) for fwhm in (0.9, 0.8, 0.7)])


@pytest.fixture
def args(psf_cube) -> dict:
    """Keyword arguments of a valid 3-band 32x40 scene."""
    rng = np.random.default_rng(42)
    variance = rng.uniform(1.0, 4.0, size=(len(BANDS), NY, NX))
    image = rng.normal(0.0, np.sqrt(variance))
    return {
        "image": image,
        "variance": variance,
        "psf": psf_cube.copy(),
        "bands": list(BANDS),
        "pixel_scale": PIXEL_SCALE,
    }


@pytest.fixture
def wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [20.5, 16.5]
    w.wcs.cd = np.array([[-1.0, 0.1], [0.1, 1.0]]) * PIXEL_SCALE / 3600
    return w


def _raises(exc_type, argument: str, *fragments: str, **kwargs):
    """Build a Scene from kwargs, expect ``exc_type`` about ``argument`` with ``fragments``."""
    with pytest.raises(exc_type) as info:
        Scene(**kwargs)
    err = info.value
    assert isinstance(err, SceneError)
    assert err.argument == argument
    msg = str(err)
    assert msg.startswith(f"{argument}:")
    for fragment in fragments:
        assert fragment in msg, msg
    return err


# ----------------------------------------------------------------------------------------------
# valid scenes
# ----------------------------------------------------------------------------------------------
def test_valid_scene(args):
    scene = Scene(**args, positions=[[3.0, 4.0], [20.5, 10.25]])
    assert scene.n_bands == 3
    assert scene.shape == (NY, NX)
    assert scene.bands == BANDS
    assert scene.pixel_scale == PIXEL_SCALE
    assert scene.units == "electron"
    assert scene.n_sources == 2
    assert scene.wcs is None
    for arr in (scene.image, scene.variance, scene.psf, scene.weight):
        assert arr.dtype == np.float32
    assert scene.image.shape == scene.variance.shape == scene.weight.shape == (3, NY, NX)
    np.testing.assert_allclose(scene.image, args["image"], rtol=1e-6)
    np.testing.assert_allclose(scene.weight, 1.0 / args["variance"], rtol=1e-6)
    assert scene.mask.dtype == bool and not scene.mask.any()
    assert scene.positions.dtype == np.float64
    assert "Scene(" in repr(scene) and "('g', 'r', 'i')" in repr(scene)


def test_single_band_2d_inputs_promoted(args):
    scene = Scene(args["image"][1], args["variance"][1], args["psf"][1], "r", PIXEL_SCALE)
    assert scene.image.shape == (1, NY, NX)
    assert scene.psf.shape == (1, 25, 25)
    assert scene.bands == ("r",)


def test_integer_image_cast_and_scalar_variance(args):
    image = np.arange(3 * NY * NX, dtype=np.int32).reshape(3, NY, NX)
    scene = Scene(**{**args, "image": image, "variance": 2})
    assert scene.image.dtype == np.float32
    np.testing.assert_array_equal(scene.image, image)
    assert np.all(scene.variance == 2.0)


def test_masked_array_image_masks_pixels(args):
    image = np.ma.masked_array(args["image"], mask=np.zeros(args["image"].shape, bool))
    image[1, 5, 6] = np.ma.masked
    scene = Scene(**{**args, "image": image})
    assert scene.mask[1, 5, 6] and scene.mask.sum() == 1
    assert scene.image[1, 5, 6] == 0.0


# ----------------------------------------------------------------------------------------------
# image validation
# ----------------------------------------------------------------------------------------------
def test_nan_pixel_unmasked_rejected(args):
    args["image"][1, 3, 4] = np.nan
    args["image"][2, 0, 0] = np.inf
    _raises(InvalidImageError, "image", "2 unmasked pixel(s)", "(1, 3, 4)", "np.inf", **args)


def test_nan_pixel_masked_accepted_and_zeroed(args):
    args["image"][1, 3, 4] = np.nan
    args["image"][2, 7, 8] = -np.inf
    args["variance"][1, 3, 4] = np.inf
    args["variance"][2, 7, 8] = np.inf
    scene = Scene(**args)
    assert scene.image[1, 3, 4] == 0.0 and scene.image[2, 7, 8] == 0.0
    assert np.isfinite(scene.image).all()
    assert scene.mask[1, 3, 4] and scene.mask[2, 7, 8] and scene.mask.sum() == 2
    assert scene.weight[1, 3, 4] == 0.0 and scene.variance[1, 3, 4] == np.inf


def test_image_too_small(args):
    args["image"] = args["image"][:, :15, :]
    args["variance"] = args["variance"][:, :15, :]
    _raises(InvalidImageError, "image", "too small", "16x16", **args)


def test_empty_image(args):
    args["image"] = np.zeros((3, 0, NX))
    _raises(InvalidImageError, "image", "empty", **args)


def test_all_pixels_masked(args):
    args["variance"] = np.full_like(args["variance"], np.inf)
    _raises(InvalidImageError, "image", "every pixel is masked", **args)


def test_image_wrong_rank(args):
    args["image"] = args["image"][np.newaxis]
    _raises(InvalidImageError, "image", "(n_band, ny, nx)", **args)


@pytest.mark.parametrize(
    ("dtype", "hint"), [(np.complex64, "complex64"), (bool, "bool"), (object, "object")]
)
def test_bad_image_dtype(args, dtype, hint):
    args["image"] = args["image"].astype(dtype)
    err = _raises(InvalidDtypeError, "image", hint, "real floating point or integer", **args)
    assert isinstance(err, TypeError)


def test_float64_overflowing_float32_rejected(args):
    args["image"][0, 1, 1] = 1e300
    _raises(InvalidImageError, "image", "float32 range", **args)


# ----------------------------------------------------------------------------------------------
# variance validation
# ----------------------------------------------------------------------------------------------
def test_negative_variance(args):
    args["variance"][2, 5, 7] = -1.0
    _raises(InvalidVarianceError, "variance", "1 negative", "(2, 5, 7)", "np.inf to mask", **args)


def test_zero_variance(args):
    args["variance"][0, 1, 2] = 0.0
    args["variance"][0, 9, 9] = 0.0
    _raises(InvalidVarianceError, "variance", "2 zero", "(0, 1, 2)", "np.inf to mask", **args)


def test_nan_variance(args):
    args["variance"][1, 2, 3] = np.nan
    _raises(InvalidVarianceError, "variance", "1 NaN", "(1, 2, 3)", **args)


def test_variance_shape_mismatch(args):
    args["variance"] = args["variance"][:, :, :-1]
    _raises(InvalidVarianceError, "variance", "(3, 32, 39)", "(3, 32, 40)", **args)


def test_variance_complex_dtype(args):
    args["variance"] = args["variance"].astype(np.complex128)
    _raises(InvalidDtypeError, "variance", "complex128", **args)


# ----------------------------------------------------------------------------------------------
# PSF validation
# ----------------------------------------------------------------------------------------------
def test_psf_even_sized(args):
    args["psf"] = np.stack([_psf(size=24)] * 3)
    _raises(InvalidPSFError, "psf", "24x24", "pad to odd size, centre on the middle pixel", **args)


def test_psf_not_square(args):
    args["psf"] = args["psf"][:, :, 1:-1]
    _raises(InvalidPSFError, "psf", "square", **args)


def test_psf_not_normalised(args):
    args["psf"][1] *= 2.0
    err = _raises(
        InvalidPSFError, "psf", "r: 2", "psf / psf.sum(axis=(-2, -1), keepdims=True)", **args
    )
    assert "g: 1" in str(err)


def test_psf_off_centre(args):
    args["psf"][2] = np.roll(args["psf"][2], 3, axis=1)
    _raises(InvalidPSFError, "psf", "band 'i'", "PSF must be centred on the middle pixel", **args)


def test_psf_one_pixel_off_centre_accepted(args):
    psf = galsim.Gaussian(fwhm=0.8).drawImage(nx=25, ny=25, scale=PIXEL_SCALE, offset=(0.6, 0))
    args["psf"][0] = psf.array / psf.array.sum()
    Scene(**args)


def test_psf_not_finite(args):
    args["psf"][0, 0, 0] = np.nan
    _raises(InvalidPSFError, "psf", "NaN or inf", "(0, 0, 0)", **args)


def test_psf_band_count_mismatch(args):
    args["psf"] = args["psf"][:2]
    _raises(BandMismatchError, "psf", "2 PSF image(s)", "3 name(s)", **args)


def test_psf_flux_fraction_default_scalar_and_array(args):
    np.testing.assert_array_equal(Scene(**args).psf_flux_fraction, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(Scene(**args, psf_flux_fraction=0.99).psf_flux_fraction, 0.99)
    scene = Scene(**args, psf_flux_fraction=[0.99, 0.98, 0.97])
    np.testing.assert_allclose(scene.unit_flux_psf.sum(axis=(-2, -1)), [0.99, 0.98, 0.97],
                               rtol=1e-5)
    np.testing.assert_allclose(scene.psf.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    assert not scene.psf_flux_fraction.flags.writeable
    # carried by every derived scene
    np.testing.assert_allclose(scene.select_bands(["i", "g"]).psf_flux_fraction, [0.97, 0.99])
    np.testing.assert_allclose(scene.with_positions([[3.0, 4.0]]).psf_flux_fraction,
                               [0.99, 0.98, 0.97])


@pytest.mark.parametrize("value, exc, fragment", [
    ([0.99, 0.98], BandMismatchError, "one fraction per band"),
    ([0.99, 1.2, 0.98], InvalidPSFError, "r: 1.2"),
    ([0.99, 0.3, 0.98], InvalidPSFError, "r: 0.3"),
    ([0.99, np.nan, 0.98], InvalidPSFError, "r: nan"),
])
def test_psf_flux_fraction_rejected(args, value, exc, fragment):
    _raises(exc, "psf_flux_fraction", fragment, psf_flux_fraction=value, **args)


def test_psf_flux_fraction_fits_round_trip(args, tmp_path):
    scene = Scene(**args, psf_flux_fraction=[0.99, 0.98, 0.97])
    scene.to_fits(tmp_path / "s.fits")
    back = Scene.from_fits(tmp_path / "s.fits")
    np.testing.assert_array_equal(back.psf_flux_fraction, scene.psf_flux_fraction)
    Scene(**args).to_fits(tmp_path / "one.fits")  # written as 1 and read back as 1
    np.testing.assert_array_equal(Scene.from_fits(tmp_path / "one.fits").psf_flux_fraction, 1.0)


# ----------------------------------------------------------------------------------------------
# bands, pixel scale, wcs, units
# ----------------------------------------------------------------------------------------------
def test_band_count_mismatch(args):
    args["bands"] = ["g", "r"]
    _raises(BandMismatchError, "bands", "3 band plane(s)", "2 name(s)", **args)


def test_2d_image_with_several_bands(args):
    args["image"] = args["image"][0]
    _raises(BandMismatchError, "bands", "2-D", "3 names", **args)


def test_duplicate_bands(args):
    args["bands"] = ["g", "r", "g"]
    _raises(BandMismatchError, "bands", "unique", "['g']", **args)


@pytest.mark.parametrize("bands", [["g", "", "i"], ["g", "r,i", "z"], ["g", 2, "i"], 3])
def test_bad_band_names(args, bands):
    args["bands"] = bands
    _raises(SceneError, "bands", **args)


@pytest.mark.parametrize("pixel_scale", [0.0, -0.2, np.nan, np.inf, "0.2", None, True, [0.2]])
def test_bad_pixel_scale(args, pixel_scale):
    args["pixel_scale"] = pixel_scale
    _raises(SceneError, "pixel_scale", "arcsec/pixel", **args)


def test_bad_wcs_type(args, wcs):
    _raises(SceneError, "wcs", "astropy.wcs.WCS", **args, wcs=wcs.to_header())


def test_bad_units(args):
    _raises(SceneError, "units", "'electron'", **args, units="")


# ----------------------------------------------------------------------------------------------
# positions
# ----------------------------------------------------------------------------------------------
def test_positions_outside(args):
    positions = [[1.0, 1.0], [NX - 0.5, 3.0], [5.0, -0.6], [-0.5, -0.5], [NX - 0.51, NY - 0.51]]
    _raises(PositionError, "positions", "source(s) [1, 2]", "-0.5 <= x < 39.5", **args,
            positions=positions)  # fmt: skip


def test_positions_wrong_shape(args):
    _raises(PositionError, "positions", "(n_source, 2)", "(3,)", **args, positions=[1.0, 2.0, 3.0])


def test_positions_not_finite(args):
    _raises(PositionError, "positions", "[1]", **args, positions=[[1, 2], [np.nan, 3]])


def test_pixel_centre_convention(args):
    """A point source drawn at pixel centre (x=i, y=j) peaks in image[:, j, i]."""
    x, y = 9, 21
    star = galsim.Gaussian(fwhm=0.6).drawImage(
        nx=NX, ny=NY, scale=PIXEL_SCALE, offset=(x - (NX - 1) / 2, y - (NY - 1) / 2)
    )
    args["image"] = np.stack([star.array] * 3)
    scene = Scene(**args, positions=[[x, y]])
    j, i = np.unravel_index(np.argmax(scene.image[0]), scene.shape)
    assert (i, j) == tuple(scene.positions[0])


# ----------------------------------------------------------------------------------------------
# immutability, derived scenes
# ----------------------------------------------------------------------------------------------
def test_immutable(args, wcs):
    scene = Scene(**args, positions=[[3.0, 4.0]], wcs=wcs)
    for arr in (scene.image, scene.variance, scene.psf, scene.weight, scene.mask, scene.positions):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 0
    with pytest.raises(AttributeError):
        scene.pixel_scale = 0.1
    with pytest.raises(AttributeError):
        del scene.image
    # the caller's arrays are copied, not frozen, and later changes do not leak in
    assert args["image"].flags.writeable
    args["image"][0, 0, 0] = 1e6
    assert scene.image[0, 0, 0] != 1e6
    scene.wcs.wcs.crval = [0.0, 0.0]
    assert scene.wcs.wcs.crval[0] == 150.1


def test_pickle_keeps_arrays_read_only(args):
    scene = pickle.loads(pickle.dumps(Scene(**args)))
    assert not scene.image.flags.writeable and not scene.variance.flags.writeable
    np.testing.assert_array_equal(scene.image, Scene(**args).image)


def test_band_index_and_select_bands(args):
    scene = Scene(**args, positions=[[3.0, 4.0]])
    assert scene.band_index("i") == 2
    with pytest.raises(UnknownBandError, match="choose one of") as info:
        scene.band_index("z")
    assert isinstance(info.value, ProbdeblendError)
    sub = scene.select_bands(["i", "g"])
    assert sub.bands == ("i", "g")
    np.testing.assert_array_equal(sub.image, scene.image[[2, 0]])
    np.testing.assert_array_equal(sub.psf, scene.psf[[2, 0]])
    np.testing.assert_array_equal(sub.positions, scene.positions)
    assert scene.select_bands("r").bands == ("r",)
    with pytest.raises(UnknownBandError):
        scene.select_bands(["g", "y"])
    with pytest.raises(BandMismatchError):
        scene.select_bands(["g", "g"])


def test_with_positions(args):
    scene = Scene(**args)
    moved = scene.with_positions([[1.0, 2.0]])
    assert scene.positions is None
    np.testing.assert_array_equal(moved.positions, [[1.0, 2.0]])
    assert moved.with_positions(None).positions is None
    with pytest.raises(PositionError):
        scene.with_positions([[NX + 1.0, 2.0]])


def test_from_inverse_variance_equivalent(args):
    args["variance"][0, 4, 5] = np.inf
    args["image"][0, 4, 5] = np.nan
    weight = np.where(np.isinf(args["variance"]), 0.0, 1.0 / args["variance"])
    a = Scene(**args)
    kw = {k: v for k, v in args.items() if k != "variance"}
    b = Scene.from_inverse_variance(**kw, weight=weight)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_allclose(a.variance, b.variance, rtol=1e-6)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_from_inverse_variance_bad_weight(args, bad):
    weight = 1.0 / args.pop("variance")
    weight[1, 2, 3] = bad
    with pytest.raises(InvalidVarianceError, match="weight 0 to mask") as info:
        Scene.from_inverse_variance(**args, weight=weight)
    assert info.value.argument == "weight" and "(1, 2, 3)" in str(info.value)


def test_detection_image(args):
    args["variance"][1, 6, 7] = np.inf
    scene = Scene(**args)
    weight = np.where(np.isinf(args["variance"]), 0.0, 1.0 / args["variance"])
    expected = np.sum(weight * np.nan_to_num(args["image"]) * ~np.isinf(args["variance"]), axis=0)
    det = scene.detection_image()
    assert det.shape == (NY, NX)
    np.testing.assert_allclose(det, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# FITS I/O
# ----------------------------------------------------------------------------------------------
def test_fits_round_trip(args, wcs, tmp_path):
    args["variance"][0, 1, 2] = np.inf
    args["image"][0, 1, 2] = np.nan
    scene = Scene(**args, positions=[[3.25, 4.5], [30.0, 12.75]], wcs=wcs, units="nJy")
    path = tmp_path / "scene.fits"
    scene.to_fits(path)
    back = Scene.from_fits(path)
    np.testing.assert_array_equal(back.image, scene.image)
    np.testing.assert_array_equal(back.variance, scene.variance)
    assert back.variance[0, 1, 2] == np.inf
    np.testing.assert_array_equal(back.psf, scene.psf)
    np.testing.assert_array_equal(back.positions, scene.positions)
    assert back.bands == scene.bands
    assert back.pixel_scale == scene.pixel_scale
    assert back.units == "nJy"
    xy = np.array([[0.0, 0.0], [17.3, 9.1], [NX - 1.0, NY - 1.0]])
    np.testing.assert_allclose(back.wcs.wcs_pix2world(xy, 0), wcs.wcs_pix2world(xy, 0), atol=1e-12)
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "VARIANCE", "PSF", "POSITIONS"]
        assert hdul[0].header["BANDS"] == "g,r,i" and hdul[0].header["NBANDS"] == 3
        assert hdul[0].header["PBVERSN"] == "1"
        assert hdul["POSITIONS"].header["PIXORIG"] == 0


def test_fits_round_trip_minimal(args, tmp_path):
    scene = Scene(**args)
    path = tmp_path / "scene.fits.gz"
    scene.to_fits(path)
    back = Scene.from_fits(path)
    assert back.positions is None and back.wcs is None
    np.testing.assert_array_equal(back.image, scene.image)
    with fits.open(path) as hdul:
        assert "POSITIONS" not in hdul


def test_fits_overwrite(args, tmp_path):
    path = tmp_path / "scene.fits"
    path.write_text("precious")
    scene = Scene(**args)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        scene.to_fits(path)
    assert path.read_text() == "precious"
    scene.to_fits(path, overwrite=True)
    assert Scene.from_fits(path).bands == BANDS
    assert sorted(os.listdir(tmp_path)) == ["scene.fits"]


def test_fits_write_is_atomic(args, tmp_path, monkeypatch):
    def fail(self, *a, **k):
        with open(a[0], "wb") as fh:  # a partial file, as a crash mid-write would leave
            fh.write(b"SIMPLE  = half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", fail)
    path = tmp_path / "scene.fits"
    with pytest.raises(OSError, match="disk full"):
        Scene(**args).to_fits(path)
    assert os.listdir(tmp_path) == []


def test_from_fits_weight_extension(args, tmp_path):
    scene = Scene(**args)
    path = tmp_path / "ivar.fits"
    scene.to_fits(path)
    with fits.open(path) as hdul:
        hdus = [h.copy() for h in hdul if h.name != "VARIANCE"]
    ivar = fits.ImageHDU(1.0 / args["variance"], name="IVAR")
    fits.HDUList([*hdus, ivar]).writeto(path, overwrite=True)
    back = Scene.from_fits(path)
    np.testing.assert_allclose(back.variance, scene.variance, rtol=1e-6)


def test_from_fits_missing_extension(args, tmp_path):
    path = tmp_path / "nopsf.fits"
    Scene(**args).to_fits(path)
    with fits.open(path) as hdul:
        hdus = [h.copy() for h in hdul if h.name != "PSF"]
    hdus[0].header["NEXTEND"] = len(hdus) - 1  # a deliberate edit, not a truncation
    fits.HDUList(hdus).writeto(path, overwrite=True, checksum=True)
    with pytest.raises(SceneError, match="'PSF' extension") as info:
        Scene.from_fits(path)
    assert info.value.argument == "psf"


# -- verified reading: checksums, truncation, corruption ----------------------------------------
def _written(args, tmp_path, name="scene.fits"):
    path = tmp_path / name
    Scene(**args).to_fits(path)
    return path


def _data_offset(path, hdu_name):
    with fits.open(path) as hdul:
        return hdul[hdu_name].fileinfo()["datLoc"]


def test_from_fits_flipped_image_bytes_names_the_hdu(args, tmp_path):
    path = _written(args, tmp_path)
    raw = bytearray(path.read_bytes())
    start = _data_offset(path, "IMAGE") + 128
    raw[start : start + 64] = bytes(b ^ 0xFF for b in raw[start : start + 64])
    path.write_bytes(bytes(raw))
    with pytest.raises(FITSChecksumError) as info:
        Scene.from_fits(path)
    err = info.value
    assert err.hdu == "IMAGE" and "'IMAGE'" in str(err) and "DATASUM" in str(err)
    assert isinstance(err, CorruptFileError) and isinstance(err, ValueError)
    assert err.argument == "path" and err.path == str(path)


def test_from_fits_edited_header_fails_checksum(args, tmp_path):
    path = _written(args, tmp_path)
    raw = path.read_bytes()
    i = raw.index(b"PIXSCALE= ")
    card = b"PIXSCALE=                  0.3"  # same length as the written card's value field
    j = raw.index(b"/", i)
    raw = raw[:i] + card.ljust(j - i) + raw[j:]
    path.write_bytes(raw)
    with pytest.raises(FITSChecksumError, match="CHECKSUM") as info:
        Scene.from_fits(path)
    assert info.value.hdu == "PRIMARY"


@pytest.mark.parametrize("where", ["header0", "header1", "image_data", "boundary", "last_byte"])
def test_from_fits_truncated_is_a_corrupt_file(args, tmp_path, where):
    path = _written(args, tmp_path)
    raw = path.read_bytes()
    image = _data_offset(path, "IMAGE")
    variance = _data_offset(path, "VARIANCE")
    cut = {"header0": 100, "header1": 2880 + 1000, "image_data": image + 100,
           "boundary": variance - 2880, "last_byte": len(raw) - 1}[where]
    path.write_bytes(raw[:cut])
    with pytest.raises(CorruptFileError) as info:
        Scene.from_fits(path)
    assert not isinstance(info.value, SceneError)
    assert any(w in str(info.value) for w in ("truncated", "not a readable FITS"))


def test_from_fits_truncated_gzip(args, tmp_path):
    path = _written(args, tmp_path, "scene.fits.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError):
        Scene.from_fits(path)


def test_from_fits_not_fits_and_missing(args, tmp_path):
    path = tmp_path / "notes.fits"
    path.write_text("this is not a FITS file\n" * 200)
    with pytest.raises(CorruptFileError, match="not a readable FITS file"):
        Scene.from_fits(path)
    with pytest.raises(InputNotFoundError) as info:
        Scene.from_fits(tmp_path / "absent.fits")
    assert isinstance(info.value, FileNotFoundError) and info.value.argument == "path"


def test_from_fits_without_checksums_still_reads(args, tmp_path):
    path = _written(args, tmp_path)
    with fits.open(path) as hdul:
        hdus = [h.copy() for h in hdul]
    for h in hdus:
        for key in ("CHECKSUM", "DATASUM"):
            h.header.remove(key, ignore_missing=True)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    assert Scene.from_fits(path).bands == BANDS


def test_to_fits_refusal_is_output_exists_error(args, tmp_path):
    path = _written(args, tmp_path)
    with pytest.raises(OutputExistsError) as info:
        Scene(**args).to_fits(path)
    assert isinstance(info.value, FileExistsError) and info.value.path == str(path)
