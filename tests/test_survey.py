"""Tests of probdeblend.survey against surveycodex (the numbers' source) and GalSim.

References are independent of the code under test: photometry is compared with
``surveycodex.utilities`` (which computes counts with astropy units), PSF widths are measured back
with ``galsim.Image.calculateFWHM`` on a finely sampled image.
"""

from __future__ import annotations

import numpy as np
import pytest
import surveycodex
from surveycodex.utilities import mag2counts, mean_sky_level

from probdeblend.errors import ProbdeblendError, UnknownBandError, UnknownSurveyError
from probdeblend.survey import Band, Survey, available_surveys, get_survey

CASES = [("lsst", "LSST", "ugrizy"), ("hsc", "HSC", "grizy"), ("euclid", "Euclid_VIS", ["IE"])]
ALL_BANDS = [(name, codex, b) for name, codex, bands in CASES for b in bands]


@pytest.mark.parametrize(("name", "codex", "bands"), CASES)
def test_surveys_have_bands_and_pixel_scales_of_surveycodex(name, codex, bands):
    survey = get_survey(name)
    sc = surveycodex.get_survey(codex)
    assert isinstance(survey, Survey)
    assert survey.name == codex
    assert survey.band_names == tuple(bands)
    assert len(survey) == len(bands)
    assert survey.pixel_scale == pytest.approx(sc.pixel_scale.to_value("arcsec"), rel=1e-12)
    for band in survey:
        assert isinstance(band, Band)
        f = sc.get_filter(band.name)
        assert band.pixel_scale == pytest.approx(sc.pixel_scale.to_value("arcsec"))
        assert band.exposure_time == pytest.approx(f.full_exposure_time.to_value("s"))
        assert band.psf_fwhm == pytest.approx(f.psf_fwhm.to_value("arcsec"))
    # the survey's own name and aliases give the same object
    assert get_survey(codex) == survey
    assert get_survey(name.upper()) == survey


@pytest.mark.parametrize(("name", "codex", "band"), ALL_BANDS)
def test_mag_to_flux_matches_surveycodex(name, codex, band):
    b = get_survey(name).band(band)
    for mag in (16.0, 18.0, 20.0):
        # mag2counts truncates to an integer number of electrons: bright enough for rtol 1e-5
        ref = mag2counts(mag, codex, band).value
        assert ref > 1e5
        assert b.mag_to_flux(mag) == pytest.approx(ref, rel=1e-5, abs=1.0)


@pytest.mark.parametrize(("name", "codex", "band"), ALL_BANDS)
def test_sky_level_matches_surveycodex(name, codex, band):
    b = get_survey(name).band(band)
    ref = mean_sky_level(codex, band).value
    # surveycodex truncates the counts per arcsec^2 to an integer before scaling by pixel area
    pixel_area = b.pixel_scale**2
    assert abs(b.sky_level - ref) <= pixel_area * 1.0 + 1e-9 * ref
    assert b.sky_level > 100  # full depth: Gaussian limit of the Poisson sky noise holds


def test_mag_flux_round_trip_and_array_behaviour():
    b = get_survey("lsst").band("r")
    mags = np.array([16.0, 20.0, 24.5, 27.0])
    flux = b.mag_to_flux(mags)
    assert flux.shape == mags.shape
    np.testing.assert_allclose(b.flux_to_mag(flux), mags, rtol=0, atol=1e-10)
    # one magnitude = factor 10**0.4 in flux, brighter = more electrons
    assert flux[0] / b.mag_to_flux(17.0) == pytest.approx(10**0.4)
    assert np.all(np.diff(flux) < 0)
    # the zero point gives 1 electron per second
    assert b.mag_to_flux(b.zeropoint) == pytest.approx(b.exposure_time)
    # non-positive flux has no magnitude
    assert np.all(np.isinf(b.flux_to_mag([0.0, -5.0])))


def test_unknown_survey_lists_the_names():
    with pytest.raises(UnknownSurveyError) as err:
        get_survey("nope")
    msg = str(err.value)
    assert "nope" in msg
    for known in ("lsst", "hsc", "euclid"):
        assert known in msg
    assert isinstance(err.value, ProbdeblendError)
    assert isinstance(err.value, KeyError)
    assert set(available_surveys()) >= {"lsst", "hsc", "euclid", "LSST", "Euclid_VIS"}
    with pytest.raises(UnknownSurveyError):
        get_survey(3)


def test_unknown_band_lists_the_bands():
    lsst = get_survey("lsst")
    with pytest.raises(UnknownBandError) as err:
        lsst.band("q")
    msg = str(err.value)
    assert "'q'" in msg and "LSST" in msg
    for b in "ugrizy":
        assert f"'{b}'" in msg
    with pytest.raises(UnknownBandError):
        lsst["q"]
    with pytest.raises(UnknownBandError):
        lsst.select(["g", "q"])
    sub = lsst.select(["i", "g"])
    assert sub.band_names == ("i", "g")
    assert sub.band("g") == lsst.band("g")


@pytest.mark.parametrize(("name", "codex", "band"), ALL_BANDS)
def test_psf_unit_sum_and_fwhm(name, codex, band):
    b = get_survey(name).band(band)
    img = b.psf_image(25)
    assert img.shape == (25, 25)
    assert img.dtype == np.float32
    assert img.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(img), img.shape) == (12, 12)
    # FWHM measured on a finely sampled image: the PSF model has the survey's quoted FWHM
    fine = b.psf().drawImage(nx=301, ny=301, scale=0.02)
    assert fine.array.sum() == pytest.approx(1.0, abs=0.02)
    assert fine.calculateFWHM() == pytest.approx(b.psf_fwhm, rel=0.02)
    # an explicit FWHM is honoured as well
    wider = b.psf(1.3 * b.psf_fwhm).drawImage(nx=301, ny=301, scale=0.02)
    assert wider.calculateFWHM() == pytest.approx(1.3 * b.psf_fwhm, rel=0.02)


def test_psf_rejects_bad_arguments():
    b = get_survey("lsst").band("r")
    with pytest.raises(ValueError, match="fwhm"):
        b.psf(0.0)
    with pytest.raises(ValueError, match="odd"):
        b.psf_image(24)


def test_noise_variance_is_sky_plus_clipped_source():
    b = get_survey("lsst").band("i")
    assert b.noise_variance() == pytest.approx(b.sky_level)
    src = np.array([[0.0, 10.0], [-50.0, 1e4]])
    var = b.noise_variance(src)
    expected = b.sky_level + np.array([[0.0, 10.0], [0.0, 1e4]])
    np.testing.assert_allclose(var, expected, rtol=1e-12)
    assert var.shape == src.shape


def test_bandpasses_are_ordered_in_wavelength():
    lsst = get_survey("lsst")
    eff = [b.bandpass.effective_wavelength for b in lsst]
    assert np.all(np.diff(eff) > 0)
    # within 5% of surveycodex's effective wavelengths (GalSim ships the same LSST curves)
    np.testing.assert_allclose(eff, [b.effective_wavelength for b in lsst], rtol=0.05)
    ie = get_survey("euclid").band("IE").bandpass
    assert ie.blue_limit < 560 and ie.red_limit > 900
