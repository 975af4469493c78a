"""Run every ``examples/*.py`` with ``--tiny`` as a subprocess (as NumPyro does for its examples).

Each example must accept ``--tiny``. An example whose ``--help`` lists ``--out`` gets an
output directory under pytest's tmp_path, so the test writes nothing into the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    # the machines running the tests are small: keep BLAS / torch to the cores we have
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "2")
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def test_examples_exist():
    assert EXAMPLES_DIR / "simulate_blends.py" in EXAMPLES


def _accepts_out(script: Path, tmp_path: Path) -> bool:
    """Whether ``--help`` lists ``--out`` (only asked when the source mentions it: --help of an
    example that imports torch / JAX costs seconds)."""
    if "--out" not in script.read_text():
        return False
    help_ = _run([str(script), "--help"], tmp_path)
    assert help_.returncode == 0, help_.stderr[-3000:]
    return "--out" in help_.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_tiny(script, tmp_path):
    args = [str(script), "--tiny"]
    out = tmp_path / "out"
    if _accepts_out(script, tmp_path):
        args += ["--out", str(out)]
    proc = _run(args, tmp_path)  # cwd = tmp_path: nothing lands in the repository
    assert proc.returncode == 0, (
        f"{script.name} --tiny failed (exit {proc.returncode})\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    if script.name == "simulate_blends.py":
        names = ["isolated_galaxies.png", "blend_scene_1.png", "blend_scene_2.png",
                 "population.png"]
        for name in names:
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            assert len(data) < 300_000
        assert "stamps/s" in proc.stdout and "scenes/s" in proc.stdout
