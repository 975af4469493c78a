"""GPU check of ``measure.shape_torch`` as run for ``report.md`` (one NVIDIA H200, torch 2.11).

The device machine has no GalSim, so ``probdeblend/__init__`` (which imports it) is bypassed
with a stub package and only ``probdeblend/measure.py`` (and ``render.py``) are loaded. The
reference file ``.shapegpu/ref.pt`` was made on the CPU beforehand:

    import torch, probdeblend as pb
    from probdeblend import measure
    pr = pb.load_prior("lsst-vae"); sig = measure.model_psf_sigma_pix(pr.frame)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(7); st = pr.decode(pr.sample((2048,))).mean(-3)
    g1, g2, ok = measure.shape_torch(st.double(), sig)
    r = measure.shear_response_stamps(st.double(), sig)
    torch.save({"stamps": st.float(), "g1": g1, "g2": g2, "ok": ok, "R": r.R, "R11": r.R11,
                "R22": r.R22, "sig": sig}, ".shapegpu/ref.pt")

Run from the repository root on the GPU machine: ``python3 benchmarks/results/shapes/
gpu_check.py`` (writes ``$OUT/gpu.json``; ``gpu.json`` beside this file is that output, with the
default GPU batch of 116,508 stamps: 415k float32 / 355k float64 stamps/s on 524,288 stamps).
Explicit batch sizes (same kind of machine, 524,288 stamps, float32): batch_size 16384 / 65536 /
262144 -> 87k / 333k / 869k stamps/s, peak GPU memory 5.3 / 6.5 / 11.4 GB (2.4 GB of it the
input).
"""

import json
import os
import sys
import time
import types


def main():
    pkg = types.ModuleType("probdeblend")
    pkg.__path__ = ["probdeblend"]
    sys.modules["probdeblend"] = pkg
    import torch

    from probdeblend import measure

    out = {}
    dev = "cuda"
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    ref = torch.load(".shapegpu/ref.pt")
    st, sig, okr = ref["stamps"], ref["sig"], ref["ok"]
    for dt in (torch.float32, torch.float64):
        g1, g2, ok = measure.shape_torch(st.to(dev, dt), sig)
        g1, g2, ok = g1.cpu().double(), g2.cpu().double(), ok.cpu()
        both = ok & okr
        dg = torch.maximum((g1 - ref["g1"])[both].abs().max(),
                           (g2 - ref["g2"])[both].abs().max())
        out[f"agree_{dt}"] = dict(max_dg=float(dg), ok_mismatch=int((ok != okr).sum()),
                                  nan_in_ok=int(torch.isnan(g1[ok]).sum()))
        print(dt, out[f"agree_{dt}"], flush=True)
    r = measure.shear_response_stamps(st.to(dev, torch.float32), sig)
    out["R_gpu_f32"] = [r.R, r.R11, r.R22]
    out["R_cpu_f64"] = [ref["R"], ref["R11"], ref["R22"]]
    print(out["R_gpu_f32"], out["R_cpu_f64"], flush=True)
    for n in (16384, 131072, 524288):
        for dt in (torch.float32, torch.float64):
            big = st.to(dev, dt).repeat(n // st.shape[0], 1, 1)
            measure.shape_torch(big[:4096], sig)
            torch.cuda.synchronize()
            ts = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                measure.shape_torch(big, sig)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            out[f"speed_{n}_{dt}"] = n / min(ts)
            print(n, dt, "stamps/s", round(n / min(ts)), "mem GB",
                  torch.cuda.max_memory_allocated() / 1e9, flush=True)
            del big
    with open(os.environ["OUT"] + "/gpu.json", "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
