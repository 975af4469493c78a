"""Table-driven fuzzing of bad arguments: every one fails fast, with the documented error class
from :mod:`probdeblend.errors`, and a message that names the argument.

Tables: :class:`~probdeblend.Scene`, :func:`~probdeblend.load_prior`, the ``probdeblend`` command
line and :func:`~probdeblend.fit` (only arguments that ``fit`` checks before any heavy work).
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

import probdeblend as pb
from probdeblend import errors as E
from probdeblend.cli import main
from probdeblend.scene import Scene
from probdeblend.scene_posterior import LaplaceConfig, NutsConfig, SviConfig

BANDS = ["g", "r"]
NY, NX = 32, 32


def _psf(k=5, n=2):
    psf = np.zeros((n, k, k), np.float32)
    psf[:, k // 2, k // 2] = 1.0
    return psf


def _args(**kw):
    base = dict(image=np.zeros((2, NY, NX), np.float32), variance=np.ones((2, NY, NX)),
                psf=_psf(), bands=BANDS, pixel_scale=0.2)
    base.update(kw)
    return base


def _ragged():
    return [[1.0, 2.0], [3.0]]


def _check(err, cls, argument, value_text=None):
    """The error contract: class, family, argument attribute and name in the message, pickles."""
    assert type(err) is cls, f"{type(err).__name__} is not {cls.__name__}: {err}"
    assert isinstance(err, E.ProbdeblendError)
    assert err.argument == argument, (err.argument, str(err))
    msg = str(err)
    assert argument in msg or (value_text is not None and value_text in msg), msg
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == msg and back.argument == err.argument


# -- Scene ----------------------------------------------------------------------------------------
SCENE_CASES = [
    # (id, override, error class, argument)
    ("image-None", {"image": None}, E.InvalidDtypeError, "image"),
    ("image-str", {"image": "pixels"}, E.InvalidDtypeError, "image"),
    ("image-ragged", {"image": _ragged()}, E.InvalidDtypeError, "image"),
    ("image-complex", {"image": np.zeros((2, NY, NX), complex)}, E.InvalidDtypeError, "image"),
    ("image-bool", {"image": np.zeros((2, NY, NX), bool)}, E.InvalidDtypeError, "image"),
    ("image-tiny", {"image": np.zeros((2, 8, 8)), "variance": 1.0}, E.InvalidImageError, "image"),
    ("image-4d", {"image": np.zeros((1, 2, NY, NX))}, E.InvalidImageError, "image"),
    ("image-empty", {"image": np.zeros((2, 0, NX)), "variance": 1.0}, E.InvalidImageError,
     "image"),
    ("image-nan", {"image": np.full((2, NY, NX), np.nan)}, E.InvalidImageError, "image"),
    ("image-overflow", {"image": np.full((2, NY, NX), 1e300)}, E.InvalidImageError, "image"),
    ("variance-negative", {"variance": -1.0}, E.InvalidVarianceError, "variance"),
    ("variance-zero", {"variance": 0.0}, E.InvalidVarianceError, "variance"),
    ("variance-nan", {"variance": np.nan}, E.InvalidVarianceError, "variance"),
    ("variance-shape", {"variance": np.ones((2, NY - 1, NX))}, E.InvalidVarianceError,
     "variance"),
    ("variance-None", {"variance": None}, E.InvalidDtypeError, "variance"),
    ("variance-all-masked", {"variance": np.inf}, E.InvalidImageError, "image"),
    ("psf-even", {"psf": np.full((2, 4, 4), 1 / 16)}, E.InvalidPSFError, "psf"),
    ("psf-not-square", {"psf": np.full((2, 5, 3), 1 / 15)}, E.InvalidPSFError, "psf"),
    ("psf-unnormalised", {"psf": _psf() * 2}, E.InvalidPSFError, "psf"),
    ("psf-nan", {"psf": np.full((2, 5, 5), np.nan)}, E.InvalidPSFError, "psf"),
    ("psf-2d-for-2-bands", {"psf": _psf(n=1)[0]}, E.InvalidPSFError, "psf"),
    ("psf-one-band", {"psf": _psf(n=1)}, E.BandMismatchError, "psf"),
    ("psf-str", {"psf": "gaussian"}, E.InvalidDtypeError, "psf"),
    ("bands-int", {"bands": 5}, E.SceneError, "bands"),
    ("bands-dup", {"bands": ["g", "g"]}, E.BandMismatchError, "bands"),
    ("bands-count", {"bands": ["g"]}, E.BandMismatchError, "bands"),
    ("bands-empty-name", {"bands": ["g", ""]}, E.SceneError, "bands"),
    ("bands-comma", {"bands": ["g", "r,i"]}, E.SceneError, "bands"),
    ("bands-non-str", {"bands": ["g", 2]}, E.SceneError, "bands"),
    ("pixel_scale-zero", {"pixel_scale": 0}, E.SceneError, "pixel_scale"),
    ("pixel_scale-negative", {"pixel_scale": -0.2}, E.SceneError, "pixel_scale"),
    ("pixel_scale-nan", {"pixel_scale": float("nan")}, E.SceneError, "pixel_scale"),
    ("pixel_scale-str", {"pixel_scale": "0.2"}, E.SceneError, "pixel_scale"),
    ("pixel_scale-bool", {"pixel_scale": True}, E.SceneError, "pixel_scale"),
    ("pixel_scale-None", {"pixel_scale": None}, E.SceneError, "pixel_scale"),
    ("pixel_scale-array", {"pixel_scale": [0.2, 0.2]}, E.SceneError, "pixel_scale"),
    ("positions-off-image", {"positions": [[100.0, 5.0]]}, E.PositionError, "positions"),
    ("positions-negative", {"positions": [[-1.0, 5.0]]}, E.PositionError, "positions"),
    ("positions-flat", {"positions": [1.0, 2.0]}, E.PositionError, "positions"),
    ("positions-3cols", {"positions": [[1.0, 2.0, 3.0]]}, E.PositionError, "positions"),
    ("positions-nan", {"positions": [[np.nan, 1.0]]}, E.PositionError, "positions"),
    ("positions-str", {"positions": "centre"}, E.InvalidDtypeError, "positions"),
    ("wcs-str", {"wcs": "RA---TAN"}, E.SceneError, "wcs"),
    ("units-empty", {"units": ""}, E.SceneError, "units"),
    ("units-int", {"units": 3}, E.SceneError, "units"),
]


@pytest.mark.parametrize(("override", "cls", "argument"),
                         [c[1:] for c in SCENE_CASES], ids=[c[0] for c in SCENE_CASES])
def test_scene_bad_arguments(override, cls, argument):
    with pytest.raises(cls) as info:
        Scene(**_args(**override))
    _check(info.value, cls, argument)


@pytest.mark.parametrize(("override", "argument", "value"), [
    ({"pixel_scale": -0.2}, "pixel_scale", -0.2),
    ({"units": ""}, "units", ""),
    ({"bands": ["g", 2]}, "bands", 2),
])
def test_scene_errors_carry_the_value(override, argument, value):
    with pytest.raises(E.SceneError) as info:
        Scene(**_args(**override))
    assert info.value.argument == argument and info.value.value == value


@pytest.mark.parametrize(("weight", "cls"), [(-1.0, E.InvalidVarianceError),
                                             (np.nan, E.InvalidVarianceError),
                                             ("w", E.InvalidDtypeError)])
def test_scene_from_inverse_variance_bad_weight(weight, cls):
    args = _args()
    args.pop("variance")
    with pytest.raises(cls) as info:
        Scene.from_inverse_variance(weight=weight, **args)
    _check(info.value, cls, "weight")


def test_scene_file_errors(tmp_path):
    with pytest.raises(E.InputNotFoundError) as info:
        Scene.from_fits(tmp_path / "absent.fits")
    _check(info.value, E.InputNotFoundError, "path")
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(E.CorruptFileError) as info:
        Scene.from_fits(bad)
    _check(info.value, E.CorruptFileError, "path")
    good = tmp_path / "good.fits"
    Scene(**_args()).to_fits(good)
    with pytest.raises(E.OutputExistsError) as info:
        Scene(**_args()).to_fits(good)
    _check(info.value, E.OutputExistsError, "path", value_text=str(good))
    with pytest.raises(E.UnknownBandError) as info:
        Scene(**_args()).band_index("z")
    assert isinstance(info.value, KeyError) and "'z'" in str(info.value)


# -- load_prior --------------------------------------------------------------------------------
def _edited_card(tmp_path, edit):
    src = pb.load_prior.__globals__["shipped_priors_dir"]()
    for suffix in (".json", ".safetensors"):
        shutil.copy(src / f"lsst-vae{suffix}", tmp_path / f"p{suffix}")
    card_path = tmp_path / "p.json"
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))
    return str(card_path)


def _set_latent(card):
    card["architecture"]["latent_dim"] += 1


def _set_kind(card):
    card["kind"] = "amortized"


PRIOR_CASES = [
    # (id, kwargs or factory(tmp_path) -> kwargs, error class, argument, text in the message)
    ("None", {"name_or_path": None}, E.ArgumentTypeError, "name_or_path", None),
    ("int", {"name_or_path": 3}, E.ArgumentTypeError, "name_or_path", None),
    ("bytes", {"name_or_path": b"lsst-vae"}, E.ArgumentTypeError, "name_or_path", None),
    ("empty", {"name_or_path": " "}, E.ArgumentError, "name_or_path", None),
    ("unknown-name", {"name_or_path": "no-such-prior"}, E.PriorLoadError, "name_or_path",
     "'no-such-prior' not found"),
    ("amortized-encoder", {"name_or_path": "lsst-vae-amortized"}, E.NotAPriorError,
     "name_or_path", "not a prior"),
    ("bands-int", {"name_or_path": "lsst-vae", "bands": 5}, E.ArgumentTypeError, "bands", None),
    ("bands-empty", {"name_or_path": "lsst-vae", "bands": []}, E.ArgumentTypeError, "bands",
     None),
    ("bands-unknown", {"name_or_path": "lsst-vae", "bands": ["r", "q"]}, E.UnknownBandError,
     "bands", "'q'"),
    ("validate_args-str", {"name_or_path": "lsst-vae", "validate_args": "yes"},
     E.ArgumentTypeError, "validate_args", None),
    ("card-latent_dim-edited", lambda t: {"name_or_path": _edited_card(t, _set_latent)},
     E.PriorLoadError, "name_or_path", "latent_dim"),
    ("card-kind-amortized", lambda t: {"name_or_path": _edited_card(t, _set_kind)},
     E.NotAPriorError, "name_or_path", "not a prior"),
]


@pytest.mark.parametrize(("kwargs", "cls", "argument", "text"),
                         [c[1:] for c in PRIOR_CASES], ids=[c[0] for c in PRIOR_CASES])
def test_load_prior_bad_arguments(kwargs, cls, argument, text, tmp_path):
    if callable(kwargs):
        kwargs = kwargs(tmp_path)
    with pytest.raises(cls) as info:
        pb.load_prior(**kwargs)
    _check(info.value, cls, argument, value_text=text)
    if text is not None:
        assert text in str(info.value)


def test_load_prior_corrupt_files(tmp_path):
    path = _edited_card(tmp_path, lambda card: None)
    weights = tmp_path / "p.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(E.ChecksumMismatchError):
        pb.load_prior(path)
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(E.PriorLoadError, match="not readable JSON"):
        pb.load_prior(path)


# -- command line ----------------------------------------------------------------------------------
@pytest.fixture
def scene_file(tmp_path):
    path = tmp_path / "scene.fits"
    Scene(**_args(positions=[[10.0, 12.0]])).to_fits(path)
    return path


def _run(argv, capsys):
    """``(status, stderr)`` of ``probdeblend argv``; argparse usage errors count as status 2."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


CLI_CASES = [
    # (id, argv with {scene}, {tmp} placeholders, option named in the message)
    ("fit-missing-scene", ["fit", "{tmp}/absent.fits", "--out", "{tmp}/r.nc"], "scene"),
    ("fit-scene-is-folder", ["fit", "{tmp}", "--out", "{tmp}/r.nc"], "scene"),
    ("fit-out-not-netcdf", ["fit", "{scene}", "--out", "{tmp}/res.ecsv"], "--out"),
    ("fit-same-products", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--summary", "{tmp}/r.nc"],
     "--summary"),
    ("fit-summary-is-scene", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--summary", "{scene}"],
     "--summary"),
    ("fit-out-exists", ["fit", "{scene}", "--out", "{tmp}/exists.nc"], "--out"),
    ("fit-summary-exists", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--summary",
                            "{tmp}/exists.nc"], "--summary"),
    ("fit-out-is-folder", ["fit", "{scene}", "--out", "{tmp}/sub.nc"], "--out"),
    ("fit-num-samples-float", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--num-samples", "2.7"],
     "--num-samples"),
    ("fit-num-samples-zero", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--num-samples", "0"],
     "--num-samples"),
    ("fit-num-chains-negative", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--num-chains", "-2"],
     "--num-chains"),
    ("fit-seed-negative", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--seed", "-1"], "--seed"),
    ("fit-seed-text", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--seed", "abc"], "--seed"),
    ("fit-method", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--method", "mcmc"], "--method"),
    ("fit-corrupt-scene", ["fit", "{tmp}/corrupt.fits", "--out", "{tmp}/r.nc"], "path"),
    ("fit-unknown-prior", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--prior", "nope"],
     "'nope' not found"),
    ("fit-encoder-as-prior", ["fit", "{scene}", "--out", "{tmp}/r.nc", "--prior",
                              "lsst-vae-amortized"], "not a prior"),
    ("demo-size", ["demo", "--size", "8", "--out", "{tmp}/d.png"], "--size"),
    ("demo-out-exists", ["demo", "--out", "{tmp}/exists.nc", "--simulate-only"], "--out"),
    ("demo-n-galaxies", ["demo", "--n-galaxies", "0", "--out", "{tmp}/d.png"], "--n-galaxies"),
    ("simulate-n", ["simulate", "{tmp}/ds", "-n", "0"], "-n"),
    ("simulate-psf-fwhm", ["simulate", "{tmp}/ds", "--psf-fwhm", "-0.4"], "--psf-fwhm"),
    ("simulate-g1", ["simulate", "{tmp}/ds", "--g1", "1.5"], "--g1"),
    ("simulate-shard-size", ["simulate", "{tmp}/ds", "--shard-size", "1.5"], "--shard-size"),
    ("simulate-kind", ["simulate", "{tmp}/ds", "--kind", "field"], "--kind"),
    ("train-missing-data", ["train-prior", "{tmp}/no-data", "--out", "{tmp}/p"], "data"),
    ("train-lr", ["train-prior", "{tmp}", "--out", "{tmp}/p", "--lr", "0"], "--lr"),
    ("train-epochs", ["train-prior", "{tmp}", "--out", "{tmp}/p", "--epochs", "0"], "--epochs"),
    ("train-out-exists", ["train-prior", "{tmp}", "--out", "{tmp}/exists.json"], "--out"),
]


@pytest.mark.parametrize(("argv", "named"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_bad_arguments(argv, named, tmp_path, scene_file, capsys):
    (tmp_path / "exists.nc").write_text("precious")
    (tmp_path / "exists.json").write_text("{}")
    (tmp_path / "sub.nc").mkdir()
    (tmp_path / "corrupt.fits").write_bytes(scene_file.read_bytes()[:5000])
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(tmp=tmp_path, scene=scene_file) for a in argv]
    status, err = _run(argv, capsys)
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith("probdeblend") and "error:" in lines[-1], err
    assert named in lines[-1], err
    # nothing was written or replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.nc").read_text() == "precious"


def test_cli_debug_shows_the_exception(tmp_path, capsys):
    with pytest.raises(E.InputNotFoundError):
        main(["--debug", "fit", str(tmp_path / "absent.fits"), "--out", str(tmp_path / "r.nc")])
    with pytest.raises(E.InputNotFoundError):
        main(["fit", str(tmp_path / "absent.fits"), "--out", str(tmp_path / "r.nc"), "--debug"])


# -- fit (arguments fit checks before any heavy work) ------------------------------------------
def _scene():
    return Scene(**_args(positions=[[10.0, 12.0]]))


FIT_CASES = [
    # (id, kwargs, expected class, argument); "scene" replaces the scene argument
    ("scene-not-a-scene", {"scene": "scene.fits"}, E.ArgumentTypeError, "scene"),
    ("method", {"method": "mcmc"}, E.ArgumentError, "method"),
    ("num_samples-zero", {"num_samples": 0}, E.ArgumentError, "num_samples"),
    ("num_samples-float", {"num_samples": 2.7}, E.ArgumentTypeError, "num_samples"),
    ("num_chains-zero", {"nuts": NutsConfig(num_chains=0)}, E.ArgumentError,
     "nuts.num_chains"),
    ("seed-float", {"seed": 1.5}, E.ArgumentTypeError, "seed"),
    ("seed-negative", {"seed": -1}, E.ArgumentError, "seed"),
    ("engine", {"nuts": NutsConfig(engine="stan")}, E.ArgumentError, "nuts.engine"),
    ("chain-method", {"nuts": NutsConfig(chain_method="pmap")}, E.ArgumentError,
     "nuts.chain_method"),
    ("nuts-not-a-config", {"nuts": {"num_chains": 2}}, E.ArgumentTypeError, "nuts"),
    ("svi-steps-zero", {"svi": SviConfig(num_steps=0)}, E.ArgumentError, "svi.num_steps"),
    ("svi-steps-negative", {"svi": SviConfig(num_steps=-3)}, E.ArgumentError,
     "svi.num_steps"),
    ("n_predictive-negative", {"n_predictive": -1}, E.ArgumentError, "n_predictive"),
    ("pareto-k-text", {"pareto_k_threshold": "0.7"}, E.ArgumentTypeError,
     "pareto_k_threshold"),
    ("model-error-negative", {"model_error": -0.1}, E.ArgumentError, "model_error"),
    ("laplace-proposal", {"laplace": LaplaceConfig(proposal="cauchy")}, E.ArgumentError,
     "laplace.proposal"),
]


@pytest.mark.parametrize(("kwargs", "cls", "argument"), [c[1:] for c in FIT_CASES],
                         ids=[c[0] for c in FIT_CASES])
def test_fit_bad_arguments(kwargs, cls, argument):
    kwargs = dict(kwargs)
    scene = kwargs.pop("scene", _scene())
    with pytest.raises((E.ProbdeblendError, ValueError, TypeError)) as info:
        pb.fit(scene, prior="lsst-vae", **kwargs)
    named = getattr(info.value, "argument", None)
    assert argument in str(info.value) or argument == named  # every row names its argument already
    _check(info.value, cls, argument)
