"""The ``mechray`` command.

Usage::

    mechray ls ./mechint_cache            # layers, shapes, rows, shards (a directory or s3://...)
    mechray inspect mechint_cache/activations_shard_000000_step_0.pt
    mechray sync ./mechint_cache          # upload shards an S3 outage left in the local spool
    mechray repair ./mechint_cache        # after a crash: adopt complete orphans, drop the gone
    mechray repair --rebuild ./mechint_cache   # manifest damaged: rebuild it from the shards
    mechray unlock ./mechint_cache        # remove the claim of a run you know is gone
    mechray analyze ./mechint_cache --analyses neuron,feature,sae --out results/
    mechray analyze s3://bucket/prefix --endpoint-url http://127.0.0.1:9000 --analyses neuron
    mechray analyze ./cache --analyses neuron,causal --model mechray.demo.text:minilm_model \
        --eval-texts sentences.txt --tokenizer path/or/name   # token contexts in the report too
    mechray demo --out demo_output        # train the demo model with capture through Ray
    mechray serve --storage ./mechint_cache --host 127.0.0.1 --port 8000   # API + dashboard
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from mechray.errors import MechrayError

# Import layout: only the standard library and mechray.errors at module level.  Each command
# imports what it needs inside its function, so `mechray ls`, `sync`, `--help` and `--version`
# start without torch or Ray (tests/system/test_cli_startup.py checks it).  New commands and
# options: keep heavy imports (torch, ray, transformers, the analysis registry) inside `cmd_*`.


def cmd_ls(args) -> int:
    from mechray.storage.reader import ShardStore

    store = ShardStore(args.path, endpoint_url=args.endpoint_url)
    spans = [str(a) if a == b else f"{a}..{b}" + (f" every {s}" if s != 1 else "")
             for a, b, s in store.step_runs()]
    print(f"{store.location}: {store.count()} shard(s), {store.total_bytes() / 1e6:.2f} MB, "
          f"steps {', '.join(spans[:8])}{' ...' if len(spans) > 8 else ''}")
    print(f"{'layer':32s} {'features':>12s} {'dtype':>9s} {'rows':>9s} {'shards':>7s} "
          f"{'dropped':>9s} {'tokens':>6s}")
    layers = store.summaries()       # typed, steps as runs: a forged head costs nothing here
    for name, info in layers.items():
        tokens = "yes" if info.provenance_shards == info.shards else \
            "some" if info.provenance_shards else "no"
        print(f"{name:32s} {str(info.feature_shape):>12s} {info.dtype:>9s} "
              f"{info.rows:9d} {info.shards:7d} {info.dropped_rows:9d} {tokens:>6s}")
    dropped = {n: i.dropped_rows for n, i in layers.items() if i.dropped_rows}
    if dropped:
        print(f"rows dropped by the cap: {dropped}; raise max_activations_per_shard (or set "
              f"rows_per_step, or save more often) to keep them")
    if args.shards:
        for e in store.shards():
            print(f"  {e['file']}  rank={e['rank']} step={e['step']} bytes={e['bytes']} "
                  f"{e['checksum'][:19]}{'  ' + e['s3_uri'] if e.get('s3_uri') else ''}")
    return 0


def _verify_against_manifest(shard: str) -> tuple[bool, str]:
    """Check a shard file against the manifest entry of the store it sits in, if it has one."""
    from pathlib import Path

    from mechray.storage.reader import ShardStore

    path = Path(shard).expanduser().resolve()
    root = path.parent.parent if path.parent.name == ".spool" else path.parent
    if not (root / "manifest.json").is_file():
        return True, f"not verified: no manifest.json beside {path.name}"
    try:
        store = ShardStore(root)
    except ValueError as exc:
        return True, f"not verified: {exc}"
    if path.name not in store.entries:
        return True, f"not verified: {path.name} is not listed in {root / 'manifest.json'}"
    try:
        store.path(path.name)
    except Exception as exc:
        return False, str(exc)
    return True, f"verified: bytes and checksum match the manifest entry of {path.name}"


def cmd_inspect(args) -> int:
    if not args.no_verify:
        ok, note = _verify_against_manifest(args.shard)
        print(f"mechray: {note}", file=sys.stderr if not ok else sys.stdout)
        if not ok:
            print("mechray: the shard does not match its manifest entry; run `mechray repair` "
                  "on its store (or --no-verify to read it anyway)", file=sys.stderr)
            return 1
    import torch

    from mechray.storage.shard import load_error

    try:
        data = torch.load(args.shard, weights_only=True, map_location="cpu", mmap=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{args.shard} is not a loadable mechray shard: {load_error(exc)}") \
            from None
    meta = data.get("metadata", {})
    summary = {k: v for k, v in meta.items() if k not in ("row_steps", "row_positions", "layers")}
    print(json.dumps(summary, indent=1, default=str))
    for name, rows in data.get("activations", {}).items():
        x = rows.float()
        print(f"{name:32s} shape={list(rows.shape)} dtype={str(rows.dtype).removeprefix('torch.')} "
              f"mean={x.mean():.4g} std={x.std():.4g} min={x.min():.4g} max={x.max():.4g}")
    if "inputs" in data:
        print(f"{'(inputs)':32s} shape={list(data['inputs'].shape)}")
    return 0


def cmd_analyze(args) -> int:
    from mechray.analysis.runner import EvalMechIntRunner
    from mechray.config import MechIntConfig

    names = [n.strip() for n in args.analyses.split(",") if n.strip()]
    params = json.loads(args.params) if args.params else {}
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object like '{{\"sae\": {{\"k\": 16}}}}', "
                         f"got {args.params!r}")
    model = _build_model(args.model) if args.model else None
    if args.model_checkpoint and model is None:
        raise ValueError("--model-checkpoint needs --model module:Class to build the model into")
    if args.ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    layers = [x for x in args.layers.split(",") if x] if args.layers else None
    config = MechIntConfig(sample_layers=layers or ["*"], analyses_to_run=names,
                           analysis_params=params, s3_endpoint_url=args.endpoint_url,
                           analysis_layers=layers, analysis_num_gpus=args.num_gpus,
                           use_ray=bool(args.ray), verbose=not args.quiet)
    runner = EvalMechIntRunner(model, config,
                               tokenizer=_tokenizer(args.tokenizer) if args.tokenizer else None)
    results = runner.run_mechint_eval(checkpoint_path=args.model_checkpoint,
                                      hidden_shards_path=args.path, out_dir=args.out,
                                      eval_data=_eval_data(args))
    report = runner.export_results(args.out)
    for name, per in results.items():
        skipped = {la: r["reason"] for la, r in per.items() if r.get("skipped")}
        print(f"{name:9s} {len(per) - len(skipped)}/{len(per)} layer(s)"
              + "".join(f"\n  skipped {la}: {why}" for la, why in skipped.items())
              + "".join(f"\n  {la}: {_headline(r)}" for la, r in per.items()
                        if not r.get("skipped") and _headline(r))
              + "".join(f"\n  WARNING {la}: {w}" for la, r in per.items()
                        for w in r.get("warnings") or []))
    print(f"results: {report.parent / 'mechint_results.json'}")
    print(f"report:  {report}")
    return 0


def _headline(r: dict) -> str:
    """One line of an SAE result's metrics (empty for other analyses)."""
    if "explained_variance" not in r or "l0" not in r:
        return ""
    ev, l0 = r.get("explained_variance"), r.get("l0")
    state = ("pretrained, no training" if r.get("trained") is False else
             f"{(r.get('train') or {}).get('steps')} steps, converged={r.get('converged')}")
    return (f"explained variance {ev if ev is None else round(ev, 4)}, L0 "
            f"{l0 if l0 is None else round(l0, 2)}, dead {r.get('dead_fraction')}, {state}")


def _eval_data(args) -> Any:
    """``--eval-texts`` (one text per line, tokenised with ``--tokenizer``) or ``--eval-inputs``
    (a ``.pt`` file of token ids or a dict of tensors, read with ``weights_only=True``)."""
    if args.eval_texts and args.eval_inputs:
        raise ValueError("give --eval-texts or --eval-inputs, not both")
    if args.eval_inputs:
        import torch

        from mechray.storage.shard import load_error

        try:
            data = torch.load(args.eval_inputs, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"--eval-inputs {args.eval_inputs} is not a loadable tensor file: "
                             f"{load_error(exc)}") from None
        return data
    if args.corrupt_texts and not args.eval_texts:
        raise ValueError("--corrupt-texts needs --eval-texts (the clean prompts, line by line)")
    if not args.eval_texts:
        return None
    if not args.tokenizer:
        raise ValueError("--eval-texts needs --tokenizer (a tokenizer directory or a Hugging "
                         "Face name) to turn the texts into model inputs")
    texts = _lines(args.eval_texts, "--eval-texts")
    tokenizer = _tokenizer(args.tokenizer)
    if args.corrupt_texts:             # prompt pairs: line i of one with line i of the other
        from mechray.analysis.inputs import PromptPairs

        return PromptPairs.from_texts(tokenizer, texts, _lines(args.corrupt_texts,
                                                               "--corrupt-texts"),
                                      max_length=args.max_length)
    return tokenizer(texts, padding=True, truncation=True, max_length=args.max_length,
                     return_tensors="pt")


def _lines(path: str, flag: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        texts = [line.rstrip("\n") for line in fh if line.strip()]
    if not texts:
        raise ValueError(f"{flag} {path} holds no non-empty lines")
    return texts


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def _build_model(spec: str):
    """``package.module:Class`` -> ``Class()`` (the user's own code, imported on request)."""
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"--model {spec!r} must look like 'package.module:ClassName'")
    return getattr(importlib.import_module(module), attr)()


def cmd_sync(args) -> int:
    from mechray.storage import s3
    from mechray.storage.recovery import sync

    s3.probe_all()   # a deliberate retry: in this process too, one try whatever happened before
    result = sync(args.path, endpoint_url=args.endpoint_url)
    print(f"{args.path}: {result['uploaded']} shard(s) uploaded, {result['pending']} still "
          f"pending, {result['shards']} listed")
    return 0 if result["pending"] == 0 else 1


def cmd_repair(args) -> int:
    from mechray.storage.recovery import repair

    report = repair(args.path, endpoint_url=args.endpoint_url, rebuild=args.rebuild)
    if report.get("set_aside"):
        print(f"set aside    {len(report['set_aside']):4d}  {' '.join(report['set_aside'])}")
    for key in ("adopted", "salvaged", "quarantined", "missing", "removed_temp"):
        names = report[key]
        print(f"{key:13s} {len(names):4d}  {' '.join(names[:6])}{' ...' if len(names) > 6 else ''}")
    print(f"{args.path}: {report['shards']} shard(s) listed"
          + (f", {report['pending_upload']} pending upload: run `mechray sync {args.path}`"
             if report["pending_upload"] else ""))
    return 0


def cmd_unlock(args) -> int:
    from mechray.storage.claim import unlock

    held = unlock(args.path)
    print(f"{args.path}: " + (f"removed {held}" if held else "no claim to remove"))
    return 0


def cmd_serve(args) -> int:
    from mechray.api import serve_app as serve

    spec = {"storage": args.storage, "num_replicas": args.num_replicas,
            "max_ongoing_requests": args.max_ongoing_requests}
    for key in ("s3_endpoint_url", "model", "model_checkpoint", "tokenizer"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.sae:
        from mechray.api.saes import parse_spec

        spec["saes"] = parse_spec(args.sae)
    print(f"mechray: serving {args.storage} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    stopped = serve.run_server(spec, host=args.host, port=args.port,
                               ray_address=args.ray_address, proxy=args.proxy)
    if stopped is True:              # served, then stopped by a signal: leave without Ray's
        logging.shutdown()           # exit hooks, which wait on a GCS that is gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_demo(args) -> int:
    from mechray.demo.run import analyse, run_demo, summarize

    parser = argparse.ArgumentParser(prog="mechray demo",
                                     description="train the demo model with capture through Ray, "
                                                 "then analyse it and write a report")
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true", help="write with threads, not Ray")
    parser.add_argument("--no-analysis", action="store_true", help="capture only")
    opts = parser.parse_args(args.extra)
    root = run_demo(opts.out, opts.steps, opts.every, use_ray=not opts.no_ray)
    print(summarize(root))
    if not opts.no_analysis:
        print(f"report: {analyse(opts.out)}")
    return 0


def _analyses_help(argv: list[str]) -> str:
    """The analyses and what each does, from the registry (which imports torch): only when the
    command line names ``analyze``, so other commands and ``mechray --help`` start without it."""
    if "analyze" not in argv:
        return "comma-separated analysis names (`mechray analyze -h` lists them)"
    from mechray.analysis.base import REGISTRY, analysis_names

    analysis_names()
    return "comma-separated, from: " + "; ".join(f"{name} ({cls.describe()})"
                                                for name, cls in REGISTRY.items())


def main(argv=None) -> int:
    from mechray.version import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="mechray", description="mechray command line")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"mechray {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ls", help="list a store's layers and shards")
    p.add_argument("path", help="a store directory or s3://bucket/prefix")
    p.add_argument("--shards", action="store_true", help="list every shard too")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    p.add_argument("--s3-retry-seconds", type=float, default=None,
                   help="how long to wait for a down or silent S3 endpoint (default 60)")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("inspect", help="show one shard's metadata and per-layer figures "
                       "(verified against its store's manifest entry first)")
    p.add_argument("shard")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the size and checksum check against the manifest")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("analyze", help="run analyses over a store; write JSON, report, plots")
    p.add_argument("path", help="a store directory or s3://bucket/prefix")
    p.add_argument("--analyses", default="neuron,feature", help=_analyses_help(argv))
    p.add_argument("--out", default="results", help="directory for results, report and plots")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    p.add_argument("--s3-retry-seconds", type=float, default=None,
                   help="how long to wait for a down or silent S3 endpoint (default 60)")
    p.add_argument("--layers", default=None, help="comma-separated captured layers (default all)")
    p.add_argument("--params", default=None,
                   help='per-analysis parameters as JSON, e.g. \'{"sae": {"k": 16}}\'')
    p.add_argument("--model", default=None, help="module:Class building the model (for causal, "
                   "circuit and SAE splicing)")
    p.add_argument("--model-checkpoint", default=None,
                   help="Lightning .ckpt or state_dict file loaded into --model")
    p.add_argument("--eval-texts", default=None, help="file of texts, one per line, tokenised "
                   "with --tokenizer: the model inputs of causal, circuit and SAE splicing")
    p.add_argument("--corrupt-texts", default=None, help="file of corrupted prompts, line i "
                   "paired with line i of --eval-texts (circuit patches clean into them)")
    p.add_argument("--eval-inputs", default=None, help=".pt file of model inputs (token ids, "
                   "or a dict of tensors such as a tokenizer's output)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or Hugging Face name "
                   "(transformers), for --eval-texts and the token contexts in the report")
    p.add_argument("--max-length", type=int, default=128, help="longest tokenised text")
    p.add_argument("--ray", action="store_true", help="fan out over Ray (see --ray-address)")
    p.add_argument("--ray-address", default="local", help="Ray address for --ray")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per fit/model Ray task")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("sync", help="upload shards left pending by an S3 outage")
    p.add_argument("path", help="the capture's storage_path (holds manifest.json)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    p.add_argument("--s3-retry-seconds", type=float, default=None,
                   help="how long to wait for a down or silent S3 endpoint (default 60)")
    p.set_defaults(fn=cmd_sync)
    p = sub.add_parser("repair", help="reconcile files and manifest after a crash")
    p.add_argument("path", help="the capture's storage_path (holds manifest.json)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    p.add_argument("--rebuild", action="store_true", help="set manifest.json aside and rebuild "
                   "it from the shard files (a damaged or hostile manifest)")
    p.set_defaults(fn=cmd_repair)
    p = sub.add_parser("unlock", help="remove a store's claim when its run is known to be gone")
    p.add_argument("path", help="the capture's storage_path")
    p.set_defaults(fn=cmd_unlock)
    p = sub.add_parser("serve", help="serve the interpretation API and dashboard with Ray Serve")
    p.add_argument("--storage", required=True, help="a store directory or s3://bucket/prefix")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint-url", dest="s3_endpoint_url", default=None,
                   help="S3-compatible endpoint")
    p.add_argument("--model", default=None, help="module:Class building the model (causal, "
                   "circuit, SAE splicing)")
    p.add_argument("--model-checkpoint", default=None, help="state_dict or Lightning .ckpt")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or Hugging Face name: "
                   "token contexts in /interpret answers and the dashboard, texts as eval_inputs")
    p.add_argument("--sae", action="append", default=None, metavar="NAME=DIR",
                   help="an SAE clients may evaluate by NAME (params.pretrained; listed at "
                   "/interpret/layers): an SAELens directory or mechray .safetensors; repeat "
                   "for more. HTTP clients never name a path")
    p.add_argument("--num-replicas", type=int, default=1, help="analysis replicas")
    p.add_argument("--max-ongoing-requests", type=int, default=16,
                   help="concurrent requests per analysis replica")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, a running one, or a new one)")
    p.add_argument("--proxy", choices=("haproxy", "python"),
                   default="python" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0"
                   else "haproxy",
                   help="what forwards HTTP to the replicas when this command starts Ray: "
                   "Serve's HAProxy ingress (default; ~10x the requests/s) or its Python proxy "
                   "(RAY_SERVE_ENABLE_HA_PROXY=0 makes that the default)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("demo", help="train the demo model with capture (see: mechray demo -h)",
                       add_help=False)
    p.set_defaults(fn=cmd_demo)
    args, extra = parser.parse_known_args(argv)
    if extra and args.fn is not cmd_demo:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from mechray.storage.s3 import BUDGET_ENV

    budget_was = os.environ.get(BUDGET_ENV)
    if getattr(args, "s3_retry_seconds", None) is not None:   # every S3 client this command makes
        os.environ[BUDGET_ENV] = str(max(0.0, args.s3_retry_seconds))
    try:
        return _run(args)
    finally:
        if budget_was is None:
            os.environ.pop(BUDGET_ENV, None)
        else:
            os.environ[BUDGET_ENV] = budget_was


def _run(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except MechrayError as exc:  # ours: the message names the value and the fix
        print(f"mechray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        print(f"mechray: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer",
                                            "mechray.storage.s3")):
            print(f"mechray: error: S3 request failed ({type(exc).__name__}: {exc}); check "
                  f"--endpoint-url, the network and your credentials", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
