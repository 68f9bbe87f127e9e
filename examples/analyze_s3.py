"""Capture to S3, then analyse straight from ``s3://bucket/prefix`` and export the results.

Usage::

    # against a local moto S3 started by the script (no AWS account needed)
    python examples/analyze_s3.py --local-s3
    python examples/analyze_s3.py --local-s3 --ray          # analysis tasks on a local Ray

    # against any S3-compatible endpoint (MinIO, Ceph, R2, ...) or AWS itself
    python examples/analyze_s3.py --endpoint-url http://127.0.0.1:9000 --bucket my-bucket \\
        --prefix exp001/activations
    python examples/analyze_s3.py --bucket my-bucket --prefix exp001/activations   # AWS

Credentials come from boto3's default chain (environment, profile, instance or pod role);
``--local-s3`` sets dummy ones for the moto server.  Steps:

1. capture: the demo model trains in a plain loop with :class:`MechIntHooks` and
   ``storage_backend='s3'``: each shard is written to the local spool
   (``{out}/spool/.spool``), uploaded to ``s3://{bucket}/{prefix}/``, then removed from the spool;
   ``manifest.json`` is uploaded beside the shards (``--backend both`` keeps local copies);
2. analysis: :class:`EvalMechIntRunner` over ``s3://{bucket}/{prefix}`` (shards are downloaded
   once into ``$MECHRAY_CACHE_DIR``, here ``{out}/s3_cache``, and checked against the manifest's
   sha256), with ``--ray`` fanned out as Ray tasks;
3. export: ``{out}/results/mechint_results.json``, ``mechint_report.md`` and plots, plus
   ``{out}/summary.json`` (the S3 keys, what was downloaded, the analyses per layer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

log = logging.getLogger("examples.analyze_s3")
LAYERS = ["mamba_backbone.blocks.1", "popt"]
PARAMS = {"feature": {"n_components": 4, "n_clusters": 3},
          "sae": {"expansion_factor": 2, "k": 4, "steps": 30, "batch_size": 64},
          "causal": {"n_inputs": 8, "top_n": 8}}


def capture(config, steps: int, model_path: Path) -> None:
    """Train the tiny demo model for ``steps`` steps, capturing sampled steps to S3; save it."""
    from mechray import MechIntHooks
    from mechray.demo.model import NeuroFMX, spike_dataset

    torch.manual_seed(0)
    model = NeuroFMX(n_neurons=16, d_model=32, n_blocks=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(spike_dataset(n_trials=8 * steps, n_neurons=16, seq_len=16), batch_size=8)
    with MechIntHooks(config).attach(model) as hooks:     # hooks off + shards durable on exit
        for step, (spikes, behaviour) in enumerate(loader):
            log_rates, pred = model(spikes)
            loss = F.poisson_nll_loss(log_rates, spikes, log_input=True) + \
                F.mse_loss(pred, behaviour)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % config.save_hidden_every_n_steps == 0:
                hooks.sampler.save_activations(step)
            hooks.sampler.clear_cache()               # keep only the sampled step's rows
    torch.save(model.state_dict(), model_path)


def analyse(config, location: str, out: Path) -> dict:
    """``EvalMechIntRunner`` over the S3 store (the model is rebuilt for causal); exports."""
    from mechray import EvalMechIntRunner
    from mechray.demo.model import NeuroFMX, spike_dataset

    model = NeuroFMX(n_neurons=16, d_model=32, n_blocks=2)
    runner = EvalMechIntRunner(model, config)
    results = runner.run_mechint_eval(
        checkpoint_path=str(out / "model.pt"),
        hidden_shards_path=location,
        eval_data=spike_dataset(n_trials=16, n_neurons=16, seq_len=16, seed=1).tensors[0])
    report = runner.export_results(out / "results")
    log.info("report: %s (analyses ran %s)", report,
             "as Ray tasks" if runner.meta["used_ray"] else "in-process")
    return results


def run(args, endpoint_url: str | None) -> dict:
    from mechray import MechIntConfig, ShardStore

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MECHRAY_CACHE_DIR", str(out / "s3_cache"))   # where S3 reads land
    config = MechIntConfig(sample_layers=LAYERS, save_hidden_every_n_steps=args.every,
                           storage_backend=args.backend, storage_path=str(out / "spool"),
                           s3_bucket=args.bucket, s3_prefix=args.prefix,
                           s3_endpoint_url=endpoint_url,
                           analyses_to_run=args.analyses.split(","), analysis_params=PARAMS,
                           eval_max_samples=16, verbose=False)
    location = f"s3://{config.s3_bucket}/{config.s3_prefix}"
    if args.ray:
        import ray

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if not ray.is_initialized():      # env (credentials, cache dir) is inherited by workers
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=args.ray_cpus,
                     include_dashboard=False, log_to_driver=False)
        config = config.model_copy(update={"use_ray": True})

    capture(config.model_copy(update={"use_ray": False}), args.steps,   # writer threads
            out / "model.pt")
    store = ShardStore(location, endpoint_url=endpoint_url)
    log.info("captured %d shard(s) to %s: %s", len(store.shards()), location,
             [e["s3_uri"] for e in store.shards()])

    results = analyse(config, location, out)
    summary = {
        "location": location, "endpoint_url": endpoint_url,
        "shards": [{"file": e["file"], "s3_uri": e["s3_uri"], "bytes": e["bytes"],
                    "checksum": e["checksum"]} for e in store.shards()],
        "downloaded": sorted(p.name for p in store.root.glob("*.pt")),
        "spool_left": sorted(p.name for p in (out / "spool" / ".spool").glob("*.pt")),
        "analyses": {name: {layer: ("skipped: " + r["reason"]) if r.get("skipped") else "ok"
                            for layer, r in per.items()} for name, per in results.items()},
        "results": str(out / "results" / "mechint_results.json"),
        "used_ray": bool(args.ray),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"analysed {location}: {len(summary['shards'])} shard(s); results in {out / 'results'}")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local-s3", action="store_true",
                       help="start a local moto S3 server on 127.0.0.1 (needs moto[server])")
    where.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL_S3)")
    parser.add_argument("--bucket", default="mechray-example")
    parser.add_argument("--prefix", default="exp001/activations")
    parser.add_argument("--backend", choices=["s3", "both"], default="s3",
                        help="'both' also keeps every shard under --out/spool")
    parser.add_argument("--out", default="analyze_s3_output")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--analyses", default="neuron,feature,sae,causal")
    parser.add_argument("--ray", action="store_true", help="run the analyses as Ray tasks")
    parser.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.local_s3:
        return run(args, args.endpoint_url)

    from mechray.testing import LocalS3

    with LocalS3() as s3:                 # http://127.0.0.1:<free port>, stopped on exit
        s3.create_bucket(args.bucket)
        summary = run(args, s3.url)
        summary["bucket_keys"] = s3.keys(args.bucket, args.prefix)
        Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
        if args.ray:
            import ray

            ray.shutdown()                # before the S3 server goes away
        return summary


if __name__ == "__main__":
    main()
