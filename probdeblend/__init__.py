"""probdeblend: probabilistic galaxy deblending with learned generative priors.

Public entry points (see the docs for each):

* :class:`Scene` — the observation you hand in (image, variance, PSFs, bands).
* :func:`get_survey` — LSST / HSC / Euclid bands, zero points, sky, PSFs, noise.
* :mod:`probdeblend.simulate` — GalSim simulations of isolated and blended galaxies with truth.
* :func:`load_prior` — shipped learned galaxy priors as Pyro / NumPyro distributions.
* :func:`fit` — deblend a scene: posterior samples as ArviZ InferenceData.
* :func:`deblend` — a whole image (any size) to a catalogue with posterior summaries;
  :mod:`probdeblend.tiles` maps it over many tiles with Dask.
* :mod:`probdeblend.diagnostics` — summary tables, convergence checks, plots.
* :mod:`probdeblend.shear` — shear posterior of an ensemble, m / c bias fits.
* :mod:`probdeblend.measure` — the library's ellipticity / flux / blendedness conventions.
"""

from __future__ import annotations

from . import errors
from .deblend import deblend  # eager like fit (numpy / astropy only): see __getattr__
from .errors import ProbdeblendError
from .fit import fit  # eager (the module imports only numpy): see the note in __getattr__
from .scene import Scene
from .survey import Band, Survey, available_surveys, get_survey

__version__ = "0.2.0"

__all__ = [
    "Scene",
    "Band",
    "Survey",
    "get_survey",
    "available_surveys",
    "load_prior",
    "list_priors",
    "fit",
    "deblend",
    "diagnostics",
    "shear",
    "simulate",
    "measure",
    "errors",
    "ProbdeblendError",
    "__version__",
]


_LAZY_MODULES = ("diagnostics", "measure", "shear", "simulate")


def __getattr__(name):  # lazy: GalSim / torch / jax are imported only when used
    if name in ("load_prior", "list_priors"):
        from .priors import io

        return getattr(io, name)
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    # ``fit`` is imported eagerly above: a lazy import here would let the import system bind
    # the *submodule* probdeblend.fit to the package attribute after the first call, so a
    # second ``probdeblend.fit(scene)`` would fail with "'module' object is not callable".
    raise AttributeError(f"module 'probdeblend' has no attribute {name!r}")
