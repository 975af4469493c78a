"""The error family (:mod:`probdeblend.errors`), the argument checks (:mod:`probdeblend.validate`)
and the atomic writers (:mod:`probdeblend.atomic`), including a SIGKILL-mid-write test."""

from __future__ import annotations

import builtins
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from probdeblend import atomic, errors, validate
from probdeblend.errors import (
    NO_VALUE,
    ArgumentError,
    ArgumentTypeError,
    OutputExistsError,
    ProbdeblendError,
    ProbdeblendWarning,
)

# one example instance of every error class, and the builtin it must also be
EXAMPLES = {
    "ProbdeblendError": (lambda: errors.ProbdeblendError("boom", argument="x", value=3), Exception),
    "ArgumentError": (lambda: errors.ArgumentError("num_samples", -3, "must be >= 1"), ValueError),
    "ArgumentTypeError": (lambda: errors.ArgumentTypeError("seed", 2.5, "not an int"), TypeError),
    "SceneError": (lambda: errors.SceneError("pixel_scale", "must be > 0", value=0.0), ValueError),
    "InvalidImageError": (lambda: errors.InvalidImageError("image", "empty"), ValueError),
    "InvalidVarianceError": (lambda: errors.InvalidVarianceError("variance", "< 0"), ValueError),
    "InvalidPSFError": (lambda: errors.InvalidPSFError("psf", "even size"), ValueError),
    "BandMismatchError": (lambda: errors.BandMismatchError("bands", "3 != 2"), ValueError),
    "PositionError": (lambda: errors.PositionError("positions", "off the image"), ValueError),
    "InvalidDtypeError": (lambda: errors.InvalidDtypeError("image", "complex"), TypeError),
    "UnknownSurveyError": (lambda: errors.UnknownSurveyError("survey 'x' unknown"), KeyError),
    "UnknownBandError": (lambda: errors.UnknownBandError("band 'q' unknown"), KeyError),
    "PriorLoadError": (lambda: errors.PriorLoadError("bad card"), ValueError),
    "ChecksumMismatchError": (lambda: errors.ChecksumMismatchError("sha256 differs"), ValueError),
    "NotAPriorError": (lambda: errors.NotAPriorError("an encoder", argument="name_or_path",
                                                     value="lsst-vae-amortized"), ValueError),
    "DatasetError": (lambda: errors.DatasetError("no meta.json"), ValueError),
    "InputNotFoundError": (lambda: errors.InputNotFoundError("/no/such.fits"), FileNotFoundError),
    "OutputExistsError": (lambda: errors.OutputExistsError("/tmp/x.nc", argument="--out"),
                          FileExistsError),
    "CorruptFileError": (lambda: errors.CorruptFileError("a.fits", "truncated"), ValueError),
    "FITSChecksumError": (lambda: errors.FITSChecksumError("a.fits", "DATASUM", hdu="IMAGE"),
                          ValueError),
    "InferenceError": (lambda: errors.InferenceError("all draws failed"), RuntimeError),
    "BudgetExceededError": (lambda: errors.BudgetExceededError(
        "NUTS would take 300 s", argument="nuts.max_seconds", projected_s=300.0, elapsed_s=12.0),
        RuntimeError),
}


def test_every_error_class_has_an_example():
    assert {c.__name__ for c in errors.all_error_classes()} == set(EXAMPLES)
    assert set(errors.__all__) >= set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_error_is_probdeblend_and_builtin(name):
    make, builtin = EXAMPLES[name]
    err = make()
    assert type(err).__name__ == name
    assert isinstance(err, ProbdeblendError) and isinstance(err, builtin)
    with pytest.raises(ProbdeblendError):
        raise err
    with pytest.raises(builtin):
        raise make()
    assert str(err) and "'" + str(err) + "'" != str(err)  # not quoted like KeyError's


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_error_pickles(name, protocol):
    err = EXAMPLES[name][0]()
    back = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert type(back) is type(err)
    assert back.args == err.args and str(back) == str(err)
    assert back.argument == err.argument
    assert back.value == err.value or (back.value is NO_VALUE and err.value is NO_VALUE)
    for attr in ("path", "hdu", "message", "projected_s", "elapsed_s"):
        assert getattr(back, attr, None) == getattr(err, attr, None)


def test_unpicklable_value_is_sent_as_its_repr():
    err = ArgumentError("callback", lambda x: x, "must be picklable")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back.value, str) and "lambda" in back.value
    assert str(back) == str(err)


def test_errors_cross_process_boundaries():
    """A worker's exception arrives in the parent intact (multiprocessing pickles it)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        fut = pool.submit(validate.check_int, "num_samples", 2.7, 1)
        with pytest.raises(ArgumentTypeError) as info:
            fut.result()
    assert info.value.argument == "num_samples" and info.value.value == 2.7


def test_argument_error_message_and_attributes():
    err = ArgumentError("svi_steps", -3, "must be >= 1, got -3")
    assert str(err) == "svi_steps: must be >= 1, got -3"
    assert err.argument == "svi_steps" and err.value == -3
    scene_err = errors.SceneError("image", "empty")  # historical (argument, message) signature
    assert str(scene_err) == "image: empty" and scene_err.value is NO_VALUE
    assert isinstance(scene_err, ArgumentError)


def test_warnings_family():
    assert issubclass(ProbdeblendWarning, UserWarning)
    assert issubclass(errors.MeasurementWarning, ProbdeblendWarning)
    assert issubclass(errors.MeasurementWarning, RuntimeWarning)  # old filters keep working
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.warn("x", errors.MeasurementWarning, stacklevel=1)
    assert issubclass(rec[0].category, ProbdeblendWarning)


def test_package_raises_only_the_family():
    """No bare builtin exception is raised in the modules this family covers."""
    import re

    root = Path(errors.__file__).parent
    names = ["scene.py", "cli.py", "atomic.py", "validate.py", "dataset.py", "survey.py",
             "simulate.py", "detection.py", "render.py", "shear.py", "priors/io.py",
             "priors/frame.py"]
    builtin_names = "|".join(n for n in dir(builtins) if n.endswith(("Error", "Exception")))
    pattern = re.compile(rf"raise ({builtin_names})\(")
    offenders = []
    for name in names:
        path = root / name
        if not path.exists():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "# protocol" in line:  # internal / Python-protocol exceptions, documented
                continue
            protocol = re.search(r"raise (NotImplemented|Attribute)Error", line)
            if pattern.search(line) and not protocol:
                offenders.append(f"{name}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# -- validate --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "cls", "fragment"),
    [
        (lambda: validate.check_int("num_samples", 2.7, minimum=1), ArgumentTypeError, "2.7"),
        (lambda: validate.check_int("num_samples", True, minimum=1), ArgumentTypeError, "True"),
        (lambda: validate.check_int("num_samples", "10", minimum=1), ArgumentTypeError, "'10'"),
        (lambda: validate.check_int("num_samples", 0, minimum=1), ArgumentError, ">= 1"),
        (lambda: validate.check_int("n", 11, maximum=10), ArgumentError, "<= 10"),
        (lambda: validate.check_float("lr", float("nan")), ArgumentError, "finite"),
        (lambda: validate.check_float("lr", 0.0, minimum=0, exclusive_minimum=True),
         ArgumentError, "> 0"),
        (lambda: validate.check_float("lr", "0.1"), ArgumentTypeError, "real number"),
        (lambda: validate.check_seed("seed", -1), ArgumentError, "non-negative"),
        (lambda: validate.check_seed("seed", 2**64), ArgumentError, "2**63"),
        (lambda: validate.check_seed("seed", 1.0), ArgumentTypeError, "integer"),
        (lambda: validate.check_choice("method", "NUTS", ("auto", "nuts")), ArgumentError,
         "did you mean 'nuts'"),
        (lambda: validate.check_choice("method", ["x"], ("auto",)), ArgumentError, "one of"),
        (lambda: validate.check_bool("progress", 1), ArgumentTypeError, "True or False"),
    ],
)
def test_validate_helpers_raise(call, cls, fragment):
    with pytest.raises(cls) as info:
        call()
    err = info.value
    assert type(err) is cls
    assert str(err).startswith(f"{err.argument}: ") and fragment in str(err)


def test_validate_helpers_return_normalised_values(tmp_path):
    assert validate.check_int("n", np.int64(5), minimum=1) == 5
    assert type(validate.check_int("n", np.int32(5))) is int
    assert validate.check_int("n", None, allow_none=True) is None
    assert validate.check_float("x", np.float32(0.5), minimum=0, maximum=1) == 0.5
    assert validate.check_float("x", 3) == 3.0
    assert validate.check_seed("seed", 0) == 0
    assert validate.check_seed("seed", None, allow_none=True) is None
    assert validate.check_choice("method", "nuts", ["auto", "nuts"]) == "nuts"
    assert validate.check_bool("flag", np.bool_(True)) is True
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert validate.check_input_path("path", f) == f
    with pytest.raises(errors.InputNotFoundError, match="does not exist"):
        validate.check_input_path("path", tmp_path / "missing")
    with pytest.raises(errors.InputNotFoundError, match="is a folder"):
        validate.check_input_path("path", tmp_path)
    with pytest.raises(OutputExistsError) as info:
        validate.check_output_path("--out", f)
    assert info.value.argument == "--out"
    assert validate.check_output_path("--out", f, overwrite=True) == f
    with pytest.raises(ArgumentError, match="also the --out output"):
        validate.check_distinct_paths({"--out": "res.ecsv", "--summary": "./res.ecsv"})
    validate.check_distinct_paths({"--out": "res.nc", "--summary": "res.ecsv", "--plot": None})


# -- atomic writers ----------------------------------------------------------------------------
def test_atomic_path_refuses_existing_and_cleans_up(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        with atomic_path_body(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic.atomic_path(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic.atomic_path(target, overwrite=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.")
        assert tmp.suffix == ".bin"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def atomic_path_body(target, overwrite):
    return atomic.atomic_path(target, overwrite=overwrite)


def test_atomic_no_clobber_at_rename(tmp_path):
    """A file that appears while the output is written is not replaced without overwrite."""
    target = tmp_path / "late.txt"
    with pytest.raises(OutputExistsError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("mine")
            target.write_text("theirs")
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["late.txt"]


def test_atomic_format_helpers(tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    arr = np.arange(12.0).reshape(3, 4)
    atomic.save_numpy(arr, tmp_path / "a.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    atomic.save_npz(tmp_path / "b.npz", x=arr, compressed=True)
    with np.load(tmp_path / "b.npz") as z:
        np.testing.assert_array_equal(z["x"], arr)
    atomic.save_numpy(arr, tmp_path / "noext")  # no .npy appended
    assert (tmp_path / "noext").exists()
    table = Table({"a": [1, 2], "b": [0.5, 1.5]})
    atomic.write_table(table, tmp_path / "t.ecsv")
    assert Table.read(tmp_path / "t.ecsv")["b"][1] == 1.5
    with pytest.raises(OutputExistsError):
        atomic.write_table(table, tmp_path / "t.ecsv")
    atomic.write_fits(fits.HDUList([fits.PrimaryHDU(arr)]), tmp_path / "f.fits.gz")
    with fits.open(tmp_path / "f.fits.gz", checksum=True) as hdul:
        assert "CHECKSUM" in hdul[0].header
        np.testing.assert_array_equal(hdul[0].data, arr)
    atomic.write_json({"k": [1, 2]}, tmp_path / "c.json")
    assert (tmp_path / "c.json").read_text().startswith("{")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_atomic_netcdf_and_torch(tmp_path):
    import arviz as az
    import torch

    idata = az.from_dict(posterior={"flux": np.random.default_rng(0).normal(size=(2, 50, 3))})
    atomic.write_netcdf(idata, tmp_path / "post.nc")
    back = az.from_netcdf(tmp_path / "post.nc")
    assert back.posterior["flux"].shape == (2, 50, 3)
    with pytest.raises(OutputExistsError):
        atomic.write_netcdf(idata, tmp_path / "post.nc")
    atomic.save_torch({"w": torch.ones(3)}, tmp_path / "ckpt.pt")
    atomic.save_torch({"w": torch.zeros(3)}, tmp_path / "ckpt.pt")  # checkpoints overwrite
    assert torch.load(tmp_path / "ckpt.pt")["w"].sum() == 0


# -- kill test ----------------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import sys, time
    from probdeblend.atomic import atomic_path
    target, n_chunks = sys.argv[1], int(sys.argv[2])
    chunk = 1 << 18  # 256 KiB
    with atomic_path(target, overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            for i in range(n_chunks):
                fh.write(bytes([i % 251]) * chunk)
                fh.flush()
                if i == 0:
                    print(tmp, flush=True)
                time.sleep(0.005)
    print("done", flush=True)
    """
)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(errors.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("existing", [True, False], ids=["old-file", "no-file"])
@pytest.mark.parametrize("kill_after_mib", [0.25, 8, 40])
def test_sigkill_mid_write_leaves_old_file_or_none(tmp_path, existing, kill_after_mib):
    """A writer SIGKILLed mid-write leaves the old file intact, or no file, never a fragment."""
    target = tmp_path / "posterior.nc"
    old = b"OLD-POSTERIOR\n" * 1000
    if existing:
        target.write_bytes(old)
    n_chunks = 240  # 60 MiB in all
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(n_chunks)],
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp.parent == tmp_path, tmp
        deadline = time.monotonic() + 60
        while tmp.exists() and tmp.stat().st_size < kill_after_mib * (1 << 20):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        written = tmp.stat().st_size if tmp.exists() else None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert written is not None and written < n_chunks * (1 << 18), "killed too late"
    if existing:
        assert target.read_bytes() == old  # the old file, intact
    else:
        assert not target.exists()  # no file at all
    # only the hidden temporary file may be left behind, never under the target's name
    assert {p.name for p in tmp_path.iterdir()} <= {target.name, tmp.name}


_NETCDF_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, arviz as az
    from probdeblend.atomic import write_netcdf
    rng = np.random.default_rng(0)
    idata = az.from_dict(posterior={"flux": rng.normal(size=(4, 2000, 400))})  # ~25 MB
    print("ready", flush=True)
    write_netcdf(idata, sys.argv[1], overwrite=True)
    print("done", flush=True)
    """
)


def test_sigkill_during_netcdf_write(tmp_path):
    """The issue's scenario: a killed ``--out result.nc`` must not leave an openable fragment."""
    import arviz as az

    target = tmp_path / "result.nc"
    az.from_dict(posterior={"flux": np.zeros((1, 10, 2))}).to_netcdf(str(target))
    old = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _NETCDF_WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".result.nc.") and p.stat().st_size > 0
                      for p in tmp_path.iterdir()):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    data = target.read_bytes()
    if data != old:  # the write completed before the kill: then it must be whole
        assert az.from_netcdf(target).posterior["flux"].shape == (4, 2000, 400)
    else:
        assert az.from_netcdf(target).posterior["flux"].shape == (1, 10, 2)
