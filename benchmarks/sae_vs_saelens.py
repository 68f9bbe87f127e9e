"""mechray's ``sae`` against SAELens on the same planted-dictionary rows, side by side.

Usage::

    .venv/bin/python benchmarks/sae_vs_saelens.py                       # the grid in README.md
    .venv/bin/python benchmarks/sae_vs_saelens.py --cases 64x256x8 --rows 20000   # smoke
    .venv/bin/python benchmarks/sae_vs_saelens.py --no-saelens          # mechray's grid only

Per case ``d x features x active`` (``--generator ours``: ``mechray.testing.planted_dictionary``,
unit directions, exactly ``active`` per row with magnitudes in [0.5, 2]; ``--generator saelens``:
``mechray.testing.saelens_planted_dictionary``, SAELens' own ``sae_lens.synthetic`` code, each
direction firing with probability ``active / features``, magnitude 1): ``--rows`` rows are
captured into a real :class:`ShardStore` (``ActivationSampler``, 3,000 rows per shard) and 8,192
more rows from the same dictionary are kept aside for scoring.  Variants, run one after the
other in this process with ``--threads`` torch threads:

* ``mechray defaults``: ``get_analysis("sae", {"k": active, "expansion_factor": 8})`` and
  nothing else (the budget rule, automatic lr, warmup/decay, calibrated thresholds);
* ``saelens defaults``: SAELens' own ``SAETrainer`` fed the same rows as precomputed
  activations (a ``DataProvider`` cycling shuffled batches), ``TopKTrainingSAEConfig(d_in,
  d_sae=8*d, k=active)`` and every other setting at its default: 2,000,000 training samples
  (SAELens' ``training_tokens`` default), batches of 4,096, lr 3e-4, constant schedule;
* ``saelens matched``: SAELens' trainer at mechray's default settings (the same steps, batch,
  lr, warmup and final linear decay).

Scores on the 8,192 aside rows for both: explained variance (1 - FVU), L0, dead fraction
(latents never active on them), recovered (mean over true directions of the best cosine with a
decoder row), training rows/s (rows seen / training seconds) and ``cpu_s``, the process CPU
seconds of the whole fit (mechray: training, evaluation, top rows; SAELens: its ``fit``).  The
machine's load average is recorded: the machine is shared, so absolute times are only
comparable within one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, setup_env, setup_logging, table, write_json  # noqa: E402

log = logging.getLogger("bench")


def write_store(path: Path, x):
    from mechray.testing import rows_store

    return rows_store(path, x, per_shard=3000)

def score(encode, decode, decoder, dictionary, x) -> dict:
    import torch

    from mechray.testing import recovered_score

    with torch.no_grad():
        z = encode(x)
        xh = decode(z)
    ev = 1 - (xh - x).pow(2).sum().item() / (x - x.mean(0)).pow(2).sum().item()
    return {"ev": round(ev, 4), "l0": round((z > 0).float().sum(1).mean().item(), 2),
            "dead": round(((z > 0).sum(0) == 0).float().mean().item(), 4),
            "recovered": round(recovered_score(dictionary, decoder.detach()), 4)}


def run_mechray(store, out: Path, k: int, dictionary, aside, params=None) -> dict:
    from mechray.analysis import Context, get_analysis
    from mechray.analysis.sae.model import load_sae

    p = {"k": k, "expansion_factor": 8, **(params or {})}
    cpu = time.process_time()
    r = get_analysis("sae", p).fit(Context(store=store, out_dir=out), "src")
    cpu = time.process_time() - cpu
    sae = load_sae(out / r["weights_path"])
    s = score(sae.encode, sae.decode, sae.W_dec, dictionary, aside)
    t = r["train"]
    return {**s, "steps": t["steps"], "batch": p.get("batch_size", 1024), "lr": t["lr"],
            "seconds": round(t["seconds"], 1), "rows_per_s": round(t["rows_per_second"]),
            "cpu_s": round(cpu, 1), "converged": r["converged"],
            "plateau_drop": t["plateau_drop"], "warnings": len(r["warnings"]),
            "_train": t}


def saelens_sae(d: int, k: int, architecture: str):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    if architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=8 * d, k=k))
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=8 * d, k=k))


def run_saelens(x, k: int, dictionary, aside, samples: int, batch: int, lr: float,
                warmup: int = 0, decay: int = 0, architecture: str = "topk") -> dict:
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d = x.shape[1]
    sae = saelens_sae(d, k, architecture)
    g = torch.Generator().manual_seed(0)

    def provider():
        while True:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - batch + 1, batch):
                yield x[perm[i:i + batch]]

    cfg = SAETrainerConfig(total_training_samples=samples, train_batch_size_samples=batch, lr=lr,
                           lr_end=lr, lr_warm_up_steps=warmup, lr_decay_steps=decay)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    t0, cpu = time.perf_counter(), time.process_time()
    trained = trainer.fit()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu
    trained.eval()
    if architecture == "batchtopk":     # SAELens' inference form of a BatchTopK SAE: JumpReLU
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        inf = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=8 * d))
        state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
        trained.process_state_dict_for_saving_inference(state)
        inf.load_state_dict(state, strict=False)
        trained = inf
    s = score(trained.encode, trained.decode, trained.W_dec, dictionary, aside)
    steps = samples // batch
    return {**s, "steps": steps, "batch": batch, "lr": lr, "seconds": round(seconds, 1),
            "rows_per_s": round(steps * batch / seconds), "cpu_s": round(cpu, 1),
            "converged": None, "warnings": None}


def step_speed(x, k: int, lr: float, rounds: int = 3, block: int = 8) -> dict:
    """Rows/s of one training step, mechray's ``SAETrainer.step`` against SAELens'
    ``SAETrainer.step`` (its public per-batch seam: forward, TopK + AuxK loss, backward, Adam),
    on the same batches of 1,024 rows, alternating blocks of ``block`` steps (interleaved)."""
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

    from mechray.analysis.sae.model import SparseAutoencoder
    from mechray.analysis.sae.train import SAETrainer

    d = x.shape[1]
    g = torch.Generator().manual_seed(1)
    batches = [x[torch.randint(0, len(x), (1024,), generator=g)] for _ in range(block)]
    sae = SparseAutoencoder(d, 8 * d, "topk", k)
    sae.init_from_data(x[:8192])
    ours = SAETrainer(sae, lr, aux_k=d // 2, total_steps=10 ** 6)
    lens = LensTrainer(cfg=SAETrainerConfig(total_training_samples=10 ** 9,
                                            train_batch_size_samples=1024, lr=lr, lr_end=lr),
                       sae=saelens_sae(d, k, "topk"), data_provider=iter(()))
    seconds = {"mechray": 0.0, "saelens": 0.0}
    for r in range(rounds + 1):                # round 0 warms both up, not counted
        for name, step in (("mechray", ours.step), ("saelens", lens.step)):
            t0 = time.perf_counter()
            for b in batches:
                step(b)
            if r:
                seconds[name] += time.perf_counter() - t0
    rows = rounds * block * 1024
    out = {k: round(rows / v) for k, v in seconds.items()}
    return {"mechray_rows_per_s": out["mechray"], "saelens_rows_per_s": out["saelens"],
            "ratio": round(out["mechray"] / out["saelens"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="64x256x5,64x256x8,128x1024x16,256x2048x16,512x4096x32")
    ap.add_argument("--saelens-cases", default="64x256x8,128x1024x16,256x2048x16",
                    help="cases also trained by SAELens (its defaults cost 2M rows each)")
    ap.add_argument("--architectures", default="topk,batchtopk")
    ap.add_argument("--ceiling", action="store_true",
                    help="also train a TopK encoder on the true dictionary (the EV ceiling)")
    ap.add_argument("--speed", action="store_true",
                    help="interleaved step-time ratio against SAELens' SAETrainer.step")
    ap.add_argument("--ceiling-steps", type=int, default=1000)
    ap.add_argument("--speed-only", action="store_true", help="only the step-time ratio")
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--generator", choices=("ours", "saelens"), default="ours",
                    help="planted rows from mechray.testing.planted_dictionary (ours) or from "
                         "SAELens' sae_lens.synthetic (saelens_planted_dictionary)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--no-saelens-matched", action="store_true",
                    help="skip SAELens at mechray's settings")
    ap.add_argument("--no-saelens-defaults", action="store_true",
                    help="skip SAELens at its defaults (2M rows per case: the slow part)")
    args = ap.parse_args()
    setup_env()
    setup_logging()
    import torch
    logging.getLogger("tqdm").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    from mechray.testing import planted_dictionary, saelens_planted_dictionary, topk_ceiling

    planted = saelens_planted_dictionary if args.generator == "saelens" else planted_dictionary

    rows, speed, meta = [], [], {"machine": machine(), "args": vars(args),
                                 "load_start": os.getloadavg()}
    for case in args.cases.split(","):
        d, f, k = map(int, case.split("x"))
        dictionary, x = planted(d, f, k, args.rows + 8192, seed=d + f + k)
        train, aside = x[: args.rows].contiguous(), x[args.rows:]
        ceiling = round(topk_ceiling(dictionary, train, aside, k, args.ceiling_steps), 4) \
            if args.ceiling else None
        with tempfile.TemporaryDirectory() as tmp:
            store = write_store(Path(tmp) / "store", train)
            for arch in [] if args.speed_only else args.architectures.split(","):
                load = os.getloadavg()[0]
                m = run_mechray(store, Path(tmp) / f"out-{arch}", k, dictionary, aside,
                                {"architecture": arch} if arch != "topk" else None)
                t = m.pop("_train")
                rows.append({"case": case, "variant": f"mechray defaults ({arch})",
                             "load": load, "topk_ceiling": ceiling, **m})
                log.info("%s", rows[-1])
                if args.no_saelens or case not in args.saelens_cases.split(","):
                    continue
                if not args.no_saelens_defaults and arch == "topk":
                    load = os.getloadavg()[0]
                    rows.append({"case": case, "variant": "saelens defaults (topk)",
                                 "load": load, **run_saelens(train, k, dictionary, aside,
                                                             2_000_000, 4096, 3e-4)})
                    log.info("%s", rows[-1])
                if args.no_saelens_matched:
                    continue
                load = os.getloadavg()[0]
                steps = t["steps"]
                rows.append({"case": case, "variant": f"saelens matched ({arch})", "load": load,
                             **run_saelens(train, k, dictionary, aside, steps * 1024, 1024,
                                           t["lr"], t["warmup_steps"], steps // 5, arch)})
                log.info("%s", rows[-1])
        if not args.no_saelens and (args.speed or args.speed_only):
            load = os.getloadavg()[0]
            speed.append({"case": case, "load": load, **step_speed(train, k, 5e-3)})
            log.info("%s", speed[-1])
    cols = ["case", "variant", "ev", "topk_ceiling", "l0", "dead", "recovered", "steps",
            "batch", "lr", "seconds", "cpu_s", "rows_per_s", "converged", "plateau_drop",
            "warnings", "load"]
    print(table(rows, cols))
    if speed:
        print(table(speed, ["case", "mechray_rows_per_s", "saelens_rows_per_s", "ratio",
                            "load"]))
    meta["load_end"] = os.getloadavg()
    write_json("sae_vs_saelens", {**meta, "rows": rows, "step_speed": speed})


if __name__ == "__main__":
    main()
