"""Resumable SAE fits: a periodic checkpoint of the trainer in the analysis output directory.

Usage::

    from mechray.analysis.sae_checkpoint import Checkpoint

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
Training data order is a function of ``seed`` and the epoch (:mod:`mechray.analysis.sae_rows`),
so a resumed fit skips the batches already seen and continues on exactly the batches the
uninterrupted fit would have used.  The checkpoint is removed when the fit finishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
TENSORS, STATE = "checkpoint.safetensors", "checkpoint.json"


class Checkpoint:
    """One layer's checkpoint directory for the fit described by ``spec``."""

    def __init__(self, base: Path, spec: dict[str, Any]):
        text = json.dumps(spec, sort_keys=True, default=str)
        self.spec = json.loads(text)
        self.directory = Path(f"{base}-{hashlib.sha1(text.encode()).hexdigest()[:12]}")

    def save(self, trainer: Any, losses: torch.Tensor, rows_seen: int, seconds: float) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors, state = trainer.state()
        tensors["losses"] = losses.detach().cpu().float().contiguous()
        tmp = self.directory / f".{TENSORS}.tmp"
        save_file(tensors, str(tmp), metadata={"n_steps": str(trainer.n_steps)})
        os.replace(tmp, self.directory / TENSORS)
        doc = {"spec": self.spec, "trainer": state, "rows_seen": rows_seen,
               "seconds": seconds, "n_steps": trainer.n_steps}
        tmp = self.directory / f".{STATE}.tmp"
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, self.directory / STATE)
        log.info("sae checkpoint at step %d: %s", trainer.n_steps, self.directory)

    def restore(self, trainer: Any) -> Optional[tuple[torch.Tensor, int, float]]:
        """Load the checkpoint into ``trainer`` if it is for this spec: ``(losses, rows_seen,
        seconds)``, or None (no checkpoint, another spec, or unreadable: logged)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        state_path, tensor_path = self.directory / STATE, self.directory / TENSORS
        if not state_path.is_file() or not tensor_path.is_file():
            return None
        try:
            doc = json.loads(state_path.read_text())
            with safe_open(str(tensor_path), framework="pt") as fh:
                steps = int((fh.metadata() or {}).get("n_steps", -1))
            if doc.get("spec") != self.spec:
                log.info("sae checkpoint %s is for other parameters or data; starting afresh",
                         self.directory)
                return None
            if steps != doc["n_steps"]:
                raise ValueError(f"tensors are at step {steps}, the state at {doc['n_steps']}")
            tensors = load_file(str(tensor_path))
            trainer.load_state(tensors, doc["trainer"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("sae checkpoint %s is unreadable (%s); starting afresh", self.directory,
                        exc)
            return None
        log.info("sae: resuming from the checkpoint at step %d (%s)", trainer.n_steps,
                 self.directory)
        return tensors["losses"], int(doc["rows_seen"]), float(doc["seconds"])

    def remove(self) -> None:
        for name in (STATE, TENSORS):
            (self.directory / name).unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass
