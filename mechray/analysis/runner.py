"""Evaluation: run the configured analyses over stored shards, then export JSON, report and plots.

Usage (the seed's Pattern 3)::

    from mechray import EvalMechIntRunner

    runner = EvalMechIntRunner(model, config)
    results = runner.run_mechint_eval(checkpoint_path="./model.pt",        # optional
                                      hidden_shards_path="./mechint_cache", # or s3://bucket/prefix
                                      eval_data=inputs)    # tensor, tokenizer output, DataLoader
    results["neuron"]["popt"]["mean"]          # {analysis: {layer: result}}
    runner.export_results("./results")         # mechint_results.json, mechint_report.md, *.png

    runner = EvalMechIntRunner(model, config, tokenizer=tokenizer)   # top rows shown as text:
    runner.run_mechint_eval(eval_data=tokenizer(texts, padding=True, return_tensors="pt"))
    runner.results["neuron"][layer]["top_k"]["contexts"][neuron][0]["text"]

Runs ``config.analyses_to_run`` with ``config.analysis_params`` (see :mod:`mechray.analysis.engine`
for how work is spread over Ray, when ``ray.is_initialized()`` or ``config.use_ray``).  The
checkpoint may be a Lightning checkpoint (its ``state_dict``) or a plain ``state_dict``; it is
read with ``torch.load(weights_only=True)``, never unpickling code.  The shards default to
``config.storage_path`` (or ``s3://{s3_bucket}/{s3_prefix}`` for the S3 backend).  Model inputs
for ``causal``/``circuit``/``sae`` splicing come from ``eval_data``, else from inputs stored with
the shards (``save_inputs=True``, newest step first), at most ``config.eval_max_samples``;
``eval_data`` is anything :func:`mechray.analysis.inputs.as_inputs` takes (a tensor, a dict of
tensors such as ``tokenizer(texts, padding=True, return_tensors="pt")``, a list of either, or a
DataLoader); dicts are passed as ``model(**batch)`` and their ``attention_mask`` keeps padding
out of every intervention and metric.
Artifacts (PCA components, SAE weights) are written to ``out_dir`` (a temporary directory by
default) and copied by :meth:`export_results`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mechray._util import json_safe  # noqa: F401  (the API imports it from here)
from mechray.analysis.inputs import MASK_KEY, as_inputs, stored_inputs
from mechray.config import MechIntConfig
from mechray.storage.reader import ShardStore

log = logging.getLogger(__name__)
RESULTS_JSON = "mechint_results.json"
REPORT_MD = "mechint_report.md"


class EvalMechIntRunner:
    """Analyses a model's stored activations (``model`` may be ``None`` for store-only analyses)."""

    def __init__(self, model: Optional[torch.nn.Module], config: Union[MechIntConfig, dict],
                 tokenizer: Any = None, context_window: int = 8):
        self.model = model
        self.config = MechIntConfig.coerce(config)
        self.tokenizer, self.context_window = tokenizer, context_window
        self.results: Optional[dict[str, dict[str, Any]]] = None
        self.meta: dict[str, Any] = {}
        self.out_dir: Optional[Path] = None

    # ------------------------------------------------------------------------------------------
    def run_mechint_eval(self, checkpoint_path: Optional[str] = None,
                         hidden_shards_path: Optional[str] = None, eval_data: Any = None, *,
                         layers: Optional[list[str]] = None, out_dir: Optional[str] = None,
                         corrupt_data: Any = None) -> dict[str, dict[str, Any]]:
        """Run the configured analyses; returns ``{analysis: {layer: result}}``.

        ``eval_data`` may also be a list of texts (tokenised with the runner's tokenizer);
        ``corrupt_data`` (inputs or texts like ``eval_data``, one per clean input) makes prompt
        pairs for ``circuit`` (and ``causal`` with ``method='corrupt'``)."""
        from mechray.analysis.engine import Engine
        from mechray.analysis.special import analysis_token_ids
        from mechray.analysis.tasks import checkpoint_beside

        cfg = self.config
        if checkpoint_path is not None:
            if self.model is None:
                raise ValueError(f"checkpoint_path={checkpoint_path!r} given but the runner has no "
                                 "model; pass it: EvalMechIntRunner(model, config)")
            load_checkpoint(self.model, checkpoint_path)
        if self.model is not None:
            self.model.eval()
        location = hidden_shards_path or default_location(cfg)
        store = ShardStore(location, endpoint_url=cfg.endpoint_url, region=cfg.s3_region)
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="mechint-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        eval_data = self._texts(eval_data, corrupt_data)
        inputs = as_inputs(eval_data, cfg.eval_max_samples, cfg.mask_key or MASK_KEY) \
            if eval_data is not None else stored_inputs(store, cfg.eval_max_samples)
        t0 = time.time()
        engine = Engine(store, out_dir=self.out_dir, use_ray=cfg.use_ray,
                        checkpoint_dir=None if out_dir or store.is_s3 else checkpoint_beside(store),
                        num_cpus=cfg.analysis_num_cpus, num_gpus=cfg.analysis_num_gpus,
                        progress=cfg.verbose, seed=cfg.sample_seed,
                        skip_token_ids=analysis_token_ids(cfg, self.tokenizer))
        self.results = engine.run(cfg.analyses_to_run, cfg.analysis_params,
                                  layers=layers or cfg.analysis_layers, model=self.model,
                                  eval_data=inputs)
        contexts = 0
        if self.tokenizer is not None:   # top rows as text (shards with token provenance)
            from mechray.analysis.contexts import add_contexts, decoder

            contexts = add_contexts(self.results, store, decoder(self.tokenizer),
                                    self.context_window)
            from mechray.analysis.contexts import name_positions
            from mechray.analysis.lens import add_logit_lens

            name_positions(self.results, decoder(self.tokenizer))

            add_logit_lens(self.results, self.model, decoder(self.tokenizer), self.out_dir)
        info = store.layers()
        self.meta = {
            "format": "mechray.results/1", "store": store.location,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 3), "analyses": list(self.results),
            "layers": {name: {k: info[name][k] for k in ("feature_shape", "dtype", "rows",
                                                           "shards", "steps")}
                       for name in (layers or cfg.analysis_layers or info)},
            "checkpoint": str(checkpoint_path) if checkpoint_path else None,
            "eval_inputs": None if inputs is None else list(inputs.tensor.shape)
            if inputs.tensor is not None else inputs.shapes,     # keyword inputs: per key
            "eval_inputs_source": "eval_data" if eval_data is not None else
            ("stored inputs" if inputs is not None else None),
            "analysis_params": cfg.analysis_params, "used_ray": engine.use_ray,
            "token_contexts": contexts,
        }
        log.info("mechray: analyses %s done in %.1f s", list(self.results), self.meta["seconds"])
        return self.results

    def _texts(self, eval_data: Any, corrupt_data: Any) -> Any:
        """Texts tokenised (pairs in one call, so they share one padded length) and
        ``corrupt_data`` joined to ``eval_data`` as :class:`PromptPairs`."""
        from mechray.analysis.inputs import PromptPairs

        def texts(v: Any) -> bool:
            return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(t, str) for t in v)
        if (texts(eval_data) or texts(corrupt_data)) and self.tokenizer is None:
            raise ValueError("eval_data/corrupt_data are texts but the runner has no tokenizer: "
                             "EvalMechIntRunner(model, config, tokenizer=...)")
        if corrupt_data is None:
            return self.tokenizer(list(eval_data), padding=True, truncation=True,
                                  return_tensors="pt") if texts(eval_data) else eval_data
        if eval_data is None:
            raise ValueError("corrupt_data needs eval_data (the clean inputs) to pair with")
        if texts(eval_data) and texts(corrupt_data):
            return PromptPairs.from_texts(self.tokenizer, list(eval_data), list(corrupt_data))
        return PromptPairs(eval_data, corrupt_data)

    def export_results(self, dir: Union[str, Path]) -> Path:
        """Write ``mechint_results.json``, ``mechint_report.md`` and plots into ``dir``; returns
        the report's path."""
        from mechray.analysis.report import write_report

        if self.results is None:
            raise RuntimeError("nothing to export yet: call run_mechint_eval(...) first")
        out = Path(dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.out_dir is not None and self.out_dir.resolve() != out.resolve():
            for src in sorted(self.out_dir.rglob("*")):
                if src.is_file():
                    dst = out / src.relative_to(self.out_dir)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
        doc = {**self.meta, "results": json_safe(self.results)}
        tmp = out / f".{RESULTS_JSON}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
        tmp.replace(out / RESULTS_JSON)
        return write_report(doc, out)


def default_location(cfg: MechIntConfig) -> str:
    """Where the config's shards are: the local directory, or ``s3://bucket/prefix``."""
    local = cfg.local_dir
    if cfg.storage_backend == "s3" or (cfg.storage_backend == "both" and
                                       not (local / "manifest.json").is_file()):
        return f"s3://{cfg.s3_bucket}/{cfg.s3_prefix}"
    return str(local)


def load_checkpoint(model: torch.nn.Module, path: Union[str, Path]) -> None:
    """Load a Lightning checkpoint (``state_dict`` key) or a plain state_dict into ``model``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a Lightning "
                                ".ckpt or of a torch.save(model.state_dict()) file") from None
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read with torch.load(weights_only=True) "
                         f"({exc}); mechray never unpickles code: save model.state_dict() "
                         "instead") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state_dict (a mapping of parameter names "
                         "to tensors, or a Lightning checkpoint with a 'state_dict' key)")
    own = model.state_dict()
    if not set(state) & set(own) and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the model "
                         "with the same architecture the checkpoint was saved from")
    model.load_state_dict(state)
    log.info("mechray: loaded %d tensors from %s", len(state), path)
