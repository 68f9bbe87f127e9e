"""The ``mechray`` command.

Usage::

    mechray ls ./mechint_cache            # layers, shapes, rows, shards (a directory or s3://...)
    mechray inspect mechint_cache/activations_shard_000000_step_0.pt
    mechray demo --out demo_output        # train the demo model with capture through Ray
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from mechray.shard import load_error


def cmd_ls(args) -> int:
    from mechray.store import ShardStore

    store = ShardStore(args.path, endpoint_url=args.endpoint_url)
    shards = store.shards()
    print(f"{store.location}: {len(shards)} shard(s), "
          f"{sum(e['bytes'] for e in shards) / 1e6:.2f} MB, steps {store.steps()}")
    print(f"{'layer':32s} {'features':>12s} {'dtype':>9s} {'rows':>9s} {'shards':>7s}")
    for name, info in store.layers().items():
        print(f"{name:32s} {str(info['feature_shape']):>12s} {info['dtype']:>9s} "
              f"{info['rows']:9d} {info['shards']:7d}")
    if args.shards:
        for e in shards:
            print(f"  {e['file']}  rank={e['rank']} step={e['step']} bytes={e['bytes']} "
                  f"{e['checksum'][:19]}{'  ' + e['s3_uri'] if e.get('s3_uri') else ''}")
    return 0


def cmd_inspect(args) -> int:
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


def cmd_demo(args) -> int:
    from mechray.demo.run import main as demo_main

    demo_main(args.extra)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mechray", description="mechray command line")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ls", help="list a store's layers and shards")
    p.add_argument("path", help="a store directory or s3://bucket/prefix")
    p.add_argument("--shards", action="store_true", help="list every shard too")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("inspect", help="show one shard's metadata and per-layer figures")
    p.add_argument("shard")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("demo", help="train the demo model with capture (see: mechray demo -h)",
                       add_help=False)
    p.set_defaults(fn=cmd_demo)
    args, extra = parser.parse_known_args(argv)
    if extra and args.fn is not cmd_demo:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        print(f"mechray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
