"""Resumable SAE fits: a periodic checkpoint of the trainer in the analysis output directory.

Usage::

    from mechray.analysis.sae.checkpoint import Checkpoint

    ckpt = Checkpoint(out_dir / "sae" / "checkpoints" / "popt", spec)   # -> popt-<spec hash>/
    done = ckpt.restore(trainer)          # None, or (losses so far, rows seen, seconds so far)
    ...
    ckpt.save(trainer, losses[:trainer.n_steps], rows_seen, seconds)   # every checkpoint_every
    ckpt.remove()                         # the fit finished: nothing left to resume

Files (no pickle): ``checkpoint.safetensors`` (the SAE's tensors, Adam's moments and step
counts, the per-latent steps since firing, the JumpReLU threshold and the per-step losses) and
``checkpoint.json`` (the spec it was written for, the step, rows seen and seconds).  Both are
written to temporary names and renamed, the JSON last, so a fit killed while writing leaves the
previous checkpoint intact.  The directory is named by the layer and a hash of the spec (every
training parameter, the layer, its row and shard counts and width), so fits with other
parameters neither resume from nor overwrite it; the spec inside is checked again on resume.
Training data order is a function of ``seed`` and the epoch (:mod:`mechray.analysis.sae.rows`),
so a resumed fit skips the batches already seen and continues on exactly the batches the
uninterrupted fit would have used.  The checkpoint is removed when the fit finishes.

**On S3** (:func:`checkpoint_root`: an ``s3://`` ``checkpoint_dir``, or by default when the store
is on S3: ``s3://<bucket>/<store prefix>.checkpoints``, where every node and a rerun find it):
the same two files under ``<root>/sae/checkpoints/<layer>-<spec hash>/``, written through a
local staging directory and uploaded tensors first, JSON last; a restore downloads both and
checks them exactly as local files; ``remove`` deletes the objects.  The client is the store's
endpoint and region when the store is on S3 (else boto3's defaults, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

log = logging.getLogger(__name__)
TENSORS, STATE = "checkpoint.safetensors", "checkpoint.json"
MAX_STATE_BYTES = 1 << 20     # the JSON state: a spec, a few numbers and key lists


def checkpoint_root(ctx: Any) -> Optional[Union[Path, str]]:
    """Where a fit's resumable checkpoints go: ``ctx.checkpoint_dir`` (a directory or an
    ``s3://`` URI) when set; else, for a store on S3, ``s3://<bucket>/<prefix>.checkpoints``
    (every worker and a rerun reach it; no shared disk needed); else ``ctx.out_dir``."""
    if ctx.checkpoint_dir is not None:
        return ctx.checkpoint_dir
    store = ctx.store
    if getattr(store, "is_s3", False):
        prefix = store.prefix.strip("/")
        return f"s3://{store.bucket}/{prefix + '.checkpoints' if prefix else 'mechray.checkpoints'}"
    return ctx.out_dir


class Checkpoint:
    """One layer's checkpoint directory for the fit described by ``spec`` (an ``s3://`` ``base``:
    objects under that prefix, see the module docstring)."""

    def __init__(self, base: Union[Path, str], spec: dict[str, Any], store: Any = None):
        text = json.dumps(spec, sort_keys=True, default=str)
        self.spec = json.loads(text)
        name = f"{base}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
        self.remote: Optional[_Remote] = None
        if name.startswith("s3://"):
            self.remote = _Remote(name, store)
            self.directory = self.remote.staging
        else:
            self.directory = Path(name)

    @classmethod
    def at(cls, directory: Path, spec: dict[str, Any]) -> "Checkpoint":
        """A checkpoint in exactly ``directory`` (Ray Train's checkpoint directories)."""
        ckpt = cls(directory, spec)
        ckpt.directory = Path(directory)
        return ckpt

    def save(self, trainer: Any, losses: torch.Tensor, rows_seen: int, seconds: float) -> None:
        """Write the checkpoint (temporary names, then renamed: the JSON last).  A directory that
        cannot be written is logged and the fit goes on without a checkpoint."""
        from safetensors.torch import save_file

        tag = f"{os.getpid()}.{threading.get_ident()}"      # concurrent identical fits
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tensors, state = trainer.state()
            tensors["losses"] = losses.detach().cpu().float().contiguous()
            tmp = self.directory / f".{TENSORS}.{tag}.tmp"
            save_file(tensors, str(tmp), metadata={"n_steps": str(trainer.n_steps)})
            os.replace(tmp, self.directory / TENSORS)
            doc = {"spec": self.spec, "trainer": state, "rows_seen": rows_seen,
                   "seconds": seconds, "n_steps": trainer.n_steps}
            tmp = self.directory / f".{STATE}.{tag}.tmp"
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
            os.replace(tmp, self.directory / STATE)
            if self.remote is not None:
                self.remote.upload(self.directory)
        except OSError as exc:
            log.warning("sae checkpoint at step %d not written to %s (%s); the fit goes on, "
                        "but a rerun cannot resume from it", trainer.n_steps, self.directory, exc)
            return
        log.info("sae checkpoint at step %d: %s", trainer.n_steps, self.directory)

    def restore(self, trainer: Any, total_steps: Optional[int] = None
                ) -> Optional[tuple[torch.Tensor, int, float]]:
        """Load the checkpoint into ``trainer`` if it is for this spec: ``(losses, rows_seen,
        seconds)``, or None (no checkpoint or another spec: logged).  A checkpoint that fails
        :func:`check` (a step outside ``1 .. total_steps - 1``, tensors of other names, shapes,
        dtypes or sizes than this trainer's, non-finite values) is set aside as
        ``<dir>.rejected-<ns>`` with a warning, and the fit starts afresh; nothing in it is
        allocated before its header is checked."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state_path, tensor_path = self.directory / STATE, self.directory / TENSORS
        if self.remote is not None:     # nothing bigger than this trainer's tensors is fetched
            most = sum(math.prod(shape) * _ITEMSIZE.get(dtype, 8) for dtype, shape in
                       expected(trainer, max(1, total_steps or 1)).values()) + (1 << 20)
            if not self.remote.download(self.directory, most):
                return None
        if not _regular(state_path) or not _regular(tensor_path):
            return None
        try:
            if state_path.stat().st_size > MAX_STATE_BYTES:
                raise ValueError(f"{STATE} is {state_path.stat().st_size} bytes (at most "
                                 f"{MAX_STATE_BYTES})")
            doc = json.loads(state_path.read_text())
            if not isinstance(doc, dict) or doc.get("spec") != self.spec:
                log.info("sae checkpoint %s is for other parameters or data; starting afresh",
                         self.directory)
                return None
            check(doc, tensor_path, trainer, total_steps)
            tensors = load_file(str(tensor_path))
            bad = [k for k, v in tensors.items() if v.is_floating_point() and
                   not bool(torch.isfinite(v).all())]
            if bad or bool((tensors["steps_since_fired"] < 0).any()):
                raise ValueError(f"non-finite values in {bad[:3]} or negative dead counters")
            trainer.load_state(tensors, doc["trainer"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError,
                SafetensorError) as exc:
            self._set_aside(exc)
            return None
        log.info("sae: resuming from the checkpoint at step %d (%s)", trainer.n_steps,
                 self.directory)
        return tensors["losses"], int(doc["rows_seen"]), float(doc["seconds"])

    def _set_aside(self, why: Exception) -> None:
        if self.remote is not None:
            self.remove()
            log.warning("sae checkpoint %s is not usable (%s); deleted, the fit starts afresh",
                        self.remote.uri, why)
            return
        aside = self.directory.with_name(f"{self.directory.name}.rejected-{time.time_ns()}")
        try:
            os.replace(self.directory, aside)
        except OSError:
            aside = self.directory
            self.remove()
        log.warning("sae checkpoint %s is not usable (%s); set aside as %s, the fit starts "
                    "afresh", self.directory, why, aside)

    def remove(self) -> None:
        """Delete the checkpoint, and its ``sae/checkpoints`` parents when they are left empty
        (and the store's ``<store>.checkpoints`` sibling when that is left empty too; nothing
        else is removed: a directory that is not empty stays)."""
        if self.remote is not None:
            self.remote.delete()
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        for name in (STATE, TENSORS):
            (self.directory / name).unlink(missing_ok=True)
        up = [self.directory, self.directory.parent, self.directory.parent.parent]
        if up[-1].parent.name.endswith(".checkpoints"):   # the store's sibling, made for these
            up.append(up[-1].parent)
        for empty in up:
            try:
                empty.rmdir()
            except OSError:
                break


class _Remote:
    """A checkpoint's two objects on S3 and the local staging directory they pass through."""

    def __init__(self, uri: str, store: Any):
        from mechray.storage import s3

        self.uri = uri
        self.bucket, self.prefix = s3.parse_uri(uri)
        on_s3 = getattr(store, "is_s3", False)
        self.client = s3.client(store.endpoint_url if on_s3 else None,
                                store.region if on_s3 else None)
        self.staging = Path(tempfile.mkdtemp(prefix="mechray-sae-ckpt-s3-"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def upload(self, directory: Path) -> None:
        """Tensors first, the JSON that names their step last (boto errors as OSError)."""
        for name in (TENSORS, STATE):
            try:
                self.client.upload_file(str(directory / name), self.bucket, self.key(name))
            except Exception as exc:
                raise OSError(f"upload to {self.uri}/{name} failed: {exc}") from exc

    def download(self, directory: Path, most: int) -> bool:
        """Both objects into ``directory`` (the tensors only up to ``most`` bytes); False when
        there is no checkpoint (or it is unreadable or too big: logged)."""
        try:
            for name, limit in ((STATE, MAX_STATE_BYTES), (TENSORS, most)):
                head = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
                if int(head["ContentLength"]) > limit:
                    raise OSError(f"{name} is {head['ContentLength']} bytes, more than the "
                                  f"{limit} this SAE's checkpoint can take")
            for name in (STATE, TENSORS):
                self.client.download_file(self.bucket, self.key(name), str(directory / name))
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchKey", "NotFound"):
                log.warning("sae checkpoint %s not read (%s); the fit starts afresh", self.uri,
                            exc)
            return False
        return True

    def delete(self) -> None:
        for name in (STATE, TENSORS):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
            except Exception as exc:
                log.warning("sae checkpoint %s/%s not deleted (%s)", self.uri, name, exc)


def _regular(path: Path) -> bool:
    """A regular file, not a link, FIFO or device (those are never opened)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check(doc: dict[str, Any], tensor_path: Path, trainer: Any,
          total_steps: Optional[int]) -> None:
    """Raise ValueError unless the state ``doc`` and the safetensors header of ``tensor_path``
    describe a checkpoint of ``trainer``: the step in ``1 .. total_steps - 1``, finite
    non-negative rows and seconds, exactly the tensors (names, dtypes, shapes) the trainer
    would write at that step, and a file no bigger than those tensors plus their header."""
    from safetensors import safe_open

    steps = doc.get("n_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1 or \
            (total_steps is not None and steps >= total_steps):
        raise ValueError(f"n_steps={steps!r} is not a step of this fit (1 .. "
                         f"{'?' if total_steps is None else total_steps - 1})")
    state = doc.get("trainer")
    if not isinstance(state, dict) or state.get("n_steps") != steps:
        raise ValueError(f"the trainer state is not at step {steps}")
    rows, seconds = doc.get("rows_seen"), doc.get("seconds")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError(f"rows_seen={rows!r} is not a row count")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or \
            not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds={seconds!r} is not a duration")
    want = expected(trainer, steps)
    keys = {str(i): sorted(names) for i, names in _opt_keys(trainer).items()}
    if state.get("opt_keys") != keys or state.get("opt_params") != len(keys):
        raise ValueError("the optimiser state does not match this SAE's parameters")
    with safe_open(str(tensor_path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("n_steps") != str(steps):
            raise ValueError(f"tensors are at step {meta.get('n_steps')!r}, the state at {steps}")
        names = set(fh.keys())
        if names != set(want):
            extra, missing = sorted(names - set(want))[:3], sorted(set(want) - names)[:3]
            raise ValueError(f"tensors do not match this SAE (unexpected {extra}, missing "
                             f"{missing})")
        total = 0
        for name, (dtype, shape) in want.items():
            part = fh.get_slice(name)
            got = (part.get_dtype(), list(part.get_shape()))
            if got != (dtype, list(shape)):
                raise ValueError(f"tensor {name!r} is {got}, this SAE needs {(dtype, shape)}")
            total += math.prod(shape) * _ITEMSIZE.get(dtype, 8)
    size = tensor_path.stat().st_size
    if size > total + (1 << 20):
        raise ValueError(f"{TENSORS} is {size} bytes, more than its {total} bytes of tensors")


def _opt_keys(trainer: Any) -> dict[int, tuple[str, ...]]:
    return {i: ("exp_avg", "exp_avg_sq", "step")
            for i in range(len(trainer.opt.param_groups[0]["params"]))}


def expected(trainer: Any, steps: int) -> dict[str, tuple[str, list[int]]]:
    """The tensors (safetensors dtype, shape) ``Checkpoint.save`` writes for ``trainer`` after
    ``steps`` steps (Adam's moments per parameter, its step count a float32 scalar)."""
    names = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}
    out = {f"model.{k}": (names[v.dtype], list(v.shape))
           for k, v in trainer.sae.state_dict().items()}
    out["steps_since_fired"] = ("I64", [trainer.sae.n_latents])
    if trainer.theta is not None:
        out["theta"] = (names[trainer.theta.dtype], list(trainer.theta.shape))
    params = trainer.opt.param_groups[0]["params"]
    for i, keys in _opt_keys(trainer).items():
        for key in keys:
            out[f"opt.{i}.{key}"] = ("F32", []) if key == "step" else \
                (names[params[i].dtype], list(params[i].shape))
    out["losses"] = ("F32", [steps])
    return out


_ITEMSIZE = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1}
