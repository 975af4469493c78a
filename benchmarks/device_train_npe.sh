#!/usr/bin/env bash
# NPE training of the lsst-vae and lsst-vaegan encoders on one lent GPU, concurrently
# (one process each; the H200 is far from saturated by one). Needs the bank built here:
#   python benchmarks/train_npe.py bank --prior lsst-vae --out .npe/bank2-lsst-vae.npz
# and is run through the `device` tool with carry [".npe/bank2-lsst-vae.npz"]; the weights come
# back as $OUT/npe-<prior>.pt (no optimiser state, < 16 MB), then:
#   python benchmarks/train_npe.py save --prior <prior> --checkpoint npe-<prior>.pt \
#       --out priors/<prior>-amortized --trained-on "1x H200" --previous <earlier stages>
# Environment: BUDGET (s of training per encoder), LR, WARMUP (steps), SEED (a new seed per
# stage, so that a warm-started stage sees new scenes), WARM=1 to start each encoder from its
# shipped weights (priors/<prior>-amortized.safetensors).
set -u
BUDGET=${BUDGET:-400}
LR=${LR:-1.5e-3}
WARMUP=${WARMUP:-500}
SEED=${SEED:-0}
WARM=${WARM:-0}
OUT=${OUT:-/tmp/npe-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
for prior in lsst-vae lsst-vaegan; do
  init=()
  [ "$WARM" = 1 ] && init=(--init "priors/$prior-amortized.safetensors")
  timeout $((BUDGET + 100)) python benchmarks/train_npe.py train --prior $prior \
    --bank .npe/bank2-lsst-vae.npz --checkpoint /tmp/ck-$prior.pt --export "$OUT/npe-$prior.pt" \
    --steps 1000000 --batch-size 1024 --lr "$LR" --warmup "$WARMUP" --seed "$SEED" \
    "${init[@]}" --time-budget "$BUDGET" --log-every 50 --eval-every 100 --throughput \
    --history-out "$OUT/hist-$prior.json" > "$OUT/log-$prior.txt" 2>&1 &
done
wait
for prior in lsst-vae lsst-vaegan; do echo "== $prior"; tail -c 1500 "$OUT/log-$prior.txt"; done
