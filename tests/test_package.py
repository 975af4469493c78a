"""The package's import contract: ``import probdeblend`` stays light."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = ("import sys, probdeblend as pb; heavy = [m for m in ('galsim', 'torch', 'jax', "
            "'numpyro', 'pyro') if m in sys.modules]; print(heavy); "
            "assert callable(pb.fit) and callable(pb.deblend)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lazy_submodules_resolve():
    import probdeblend as pb

    assert pb.simulate.blend_scene and pb.diagnostics.summary_table and pb.measure.shape_torch
    assert pb.shear.infer
