#!/usr/bin/env bash
# One SAE on one GPU: mechray's `sae` (device cuda) against SAELens' SAETrainer on the same GPU
# and the same planted-dictionary rows, same steps, batch and lr; rows/s, EV and L0 of both
# (issue 23 item 4).  Short: ~1-3 min on an H100 at the defaults.  Run from the repo root,
# e.g. through the device tool with timeout_s=540:
#   bash benchmarks/sae_gpu.sh                 # D=1024 LATENTS=16384 K=32 ROWS=400000 STEPS=2000
#   D=4096 LATENTS=65536 ROWS=200000 STEPS=500 bash benchmarks/sae_gpu.sh   # a bigger dictionary
# Output: a JSON line per trainer and the ratio, also in $OUT/sae_gpu.json ($OUT: benchmarks/out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export DEVICE="${DEVICE:-cuda}"     # DEVICE=cpu with tiny sizes: a smoke run of this script
[ "$DEVICE" = cpu ] || "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -c "import sae_lens" 2>/dev/null || "$PY" -m pip install -q 'sae-lens>=6.54' || true
export D="${D:-1024}" LATENTS="${LATENTS:-16384}" K="${K:-32}" ROWS="${ROWS:-400000}"
export STEPS="${STEPS:-2000}" BATCH="${BATCH:-4096}" LR="${LR:-3e-4}" OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
"$PY" - <<'PY'
import json, os, tempfile, time
from pathlib import Path

import torch

from mechray.testing import planted_dictionary, recovered_score

d, n, k = int(os.environ["D"]), int(os.environ["LATENTS"]), int(os.environ["K"])
rows, steps = int(os.environ["ROWS"]), int(os.environ["STEPS"])
batch, lr = int(os.environ["BATCH"]), float(os.environ["LR"])
dev = os.environ["DEVICE"]
dictionary, x = planted_dictionary(d, n // 8, k, rows + 8192, seed=0)
train, aside = x[:rows].contiguous(), x[rows:].to(dev)


def ev(encode, decode):
    with torch.no_grad():
        xh = torch.cat([decode(encode(b)) for b in aside.split(4096)])
        z = torch.cat([(encode(b) > 0).float().sum(-1) for b in aside.split(4096)])
    fvu = (xh - aside).pow(2).sum() / (aside - aside.mean(0)).pow(2).sum()
    return round(1 - float(fvu), 4), round(float(z.mean()), 2)


out = []
# mechray: a real store, the sae analysis on CUDA (data kept on the GPU when it fits buffer_mb)
import sys  # noqa: E402

sys.path.insert(0, "benchmarks")
from sae_vs_saelens import write_store  # noqa: E402  (a real store, 3,000 rows per shard)
with tempfile.TemporaryDirectory() as tmp:
    store = write_store(Path(tmp) / "store", train)
    from mechray.analysis import Context, get_analysis
    from mechray.analysis.sae.model import load_sae

    p = {"n_latents": n, "k": k, "steps": steps, "batch_size": batch, "lr": lr,
         "device": dev, "top_latents": 0, "buffer_mb": 16384, "checkpoint_every": 0}
    t0 = time.perf_counter()
    r = get_analysis("sae", p).fit(Context(store=store, out_dir=Path(tmp) / "out"), "src")
    wall = time.perf_counter() - t0
    sae = load_sae(Path(tmp) / "out" / r["weights_path"]).to(dev).eval()
    e, l0 = ev(sae.encode, sae.decode)
    out.append({"trainer": "mechray", "rows_per_s": round(r["train"]["rows_per_second"]),
                "train_s": round(r["train"]["seconds"], 1), "wall_s": round(wall, 1),
                "ev": e, "l0": l0, "recovered": round(recovered_score(dictionary.to(dev),
                                                                      sae.W_dec), 4)})
print(json.dumps(out[-1]), flush=True)

# SAELens 6.54 on the same GPU, rows, steps, batch and lr (rows already on the device)
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

gpu = train.to(dev)
g = torch.Generator(device=dev).manual_seed(0)


def provider():
    while True:
        perm = torch.randperm(len(gpu), generator=g, device=dev)
        for i in range(0, len(gpu) - batch + 1, batch):
            yield gpu[perm[i:i + batch]]


lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=dev))
cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                       lr=lr, lr_end=lr, device=dev)
trainer = SAETrainer(cfg=cfg, sae=lens, data_provider=provider())
torch.cuda.synchronize() if dev != "cpu" else None
t0 = time.perf_counter()
trained = trainer.fit().eval()
torch.cuda.synchronize() if dev != "cpu" else None
secs = time.perf_counter() - t0
e, l0 = ev(trained.encode, trained.decode)
out.append({"trainer": "saelens", "rows_per_s": round(steps * batch / secs),
            "train_s": round(secs, 1), "ev": e, "l0": l0,
            "recovered": round(recovered_score(dictionary.to(dev), trained.W_dec), 4)})
print(json.dumps(out[-1]), flush=True)
res = {"device": torch.cuda.get_device_name() if dev != "cpu" else "cpu", "d": d, "n_latents": n, "k": k, "rows": rows,
       "steps": steps, "batch": batch, "lr": lr, "results": out,
       "ratio_rows_per_s": round(out[0]["rows_per_s"] / out[1]["rows_per_s"], 2)}
Path(os.environ["OUT"], "sae_gpu.json").write_text(json.dumps(res, indent=1))
print(json.dumps({"ratio_rows_per_s (mechray / saelens)": res["ratio_rows_per_s"]}))
PY
