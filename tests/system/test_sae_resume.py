"""SAE checkpoints where a rerun finds them, and checkpoints that cannot be trusted.

A killed ``mechray analyze`` (SIGKILL of the real process, mid-fit) resumes when the same
command runs again, from the checkpoint in the results directory (issue 19 defect 9); a hostile
checkpoint (a step count of 10**9 or -5, oversized or mis-shaped tensors, NaN weights, a FIFO)
is set aside with a warning and the fit starts afresh (defect 14).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechray.analysis import Context, get_analysis
from mechray.analysis.engine import Engine
from mechray.storage.reader import ShardStore
from mechray.testing import planted_dictionary, rows_store

PARAMS = {"n_latents": 64, "k": 3, "batch_size": 128, "lr": 3e-3, "device": "cpu",
          "top_latents": 0}


write_store = rows_store

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    _, x = planted_dictionary(16, 32, 3, 4000, seed=0)
    return write_store(tmp_path_factory.mktemp("resume_store"), x)


def _analyze(store_path, out, params) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "mechray.cli", "analyze", str(store_path),
                             "--analyses", "sae", "--params", json.dumps({"sae": params}),
                             "--out", str(out), "-q"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_killed_mechray_analyze_resumes_from_its_checkpoint_when_rerun(store, tmp_path):
    """SIGKILL after the first checkpoint is on disk; the same command again reports
    ``resumed_from_step`` (a multiple of checkpoint_every) and trains only the rest.  Before,
    checkpoints went to the task's private temp directory and the rerun started from step 0."""
    params = {**PARAMS, "steps": 600, "checkpoint_every": 25, "batch_size": 64}
    out = tmp_path / "results"
    proc = _analyze(store.root, out, params)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("sae/checkpoints/src-*/checkpoint.json")):
            assert proc.poll() is None, f"analyze ended before a checkpoint: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "mechint_results.json").exists()
    [ckpt] = out.glob("sae/checkpoints/src-*")
    at = json.loads((ckpt / "checkpoint.json").read_text())["n_steps"]
    assert 25 <= at < 600
    again = _analyze(store.root, out, params)
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log
    result = json.loads((out / "mechint_results.json").read_text())["results"]["sae"]["src"]
    assert result["train"]["resumed_from_step"] >= at and \
        result["train"]["resumed_from_step"] % 25 == 0, result["train"]
    assert result["train"]["steps"] == 600 and not ckpt.exists()
    assert result["explained_variance"] > 0.5


def test_the_engine_keeps_checkpoints_beside_the_store_without_a_results_dir(store, tmp_path,
                                                                            monkeypatch):
    """No ``out_dir`` (an API job, say): checkpoints go to ``<store>.checkpoints``, not a temp
    directory, and a second run with the same parameters resumes from them."""
    from mechray.analysis.sae.train import SAETrainer

    params = {**PARAMS, "steps": 120, "checkpoint_every": 50}
    real_step = SAETrainer.step

    def dying_step(self, x):
        if self.n_steps == 70:
            raise RuntimeError("killed")
        return real_step(self, x)

    local = ShardStore(store.root)
    monkeypatch.setattr(SAETrainer, "step", dying_step)
    with pytest.raises(RuntimeError, match="killed"):
        Engine(local, use_ray=False, progress=False, strict=True).run(["sae"], {"sae": params})
    monkeypatch.setattr(SAETrainer, "step", real_step)
    beside = store.root.with_name(store.root.name + ".checkpoints")
    assert list(beside.glob("sae/checkpoints/src-*/checkpoint.json"))
    done = Engine(local, use_ray=False, progress=False).run(["sae"], {"sae": params})
    assert done["sae"]["src"]["train"]["resumed_from_step"] == 50
    assert not (beside / "sae").exists()        # nothing left behind but the empty root


# --- hostile checkpoints ------------------------------------------------------------------------
def _fit(store, out, **params):
    return get_analysis("sae", {**PARAMS, **params}).fit(Context(store=store, out_dir=out), "src")


@pytest.fixture(scope="module")
def checkpoint_template(store, tmp_path_factory):
    """A real checkpoint at step 50 of a 100-step fit, left by a fit that died at step 60."""
    from mechray.analysis.sae.train import SAETrainer

    out = tmp_path_factory.mktemp("template")
    real_step = SAETrainer.step

    def dying_step(self, x):
        if self.n_steps == 60:
            raise RuntimeError("killed")
        return real_step(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SAETrainer, "step", dying_step)
        with pytest.raises(RuntimeError):
            _fit(store, out, steps=100, checkpoint_every=50)
    [ckpt] = out.glob("sae/checkpoints/src-*")
    return ckpt


@pytest.fixture
def planted_checkpoint(checkpoint_template, tmp_path):
    """A copy of the template checkpoint where a fit into ``tmp_path`` looks for it."""
    import shutil

    dest = tmp_path / "sae" / "checkpoints" / checkpoint_template.name
    shutil.copytree(checkpoint_template, dest)
    return dest


def _forge_state(ckpt, **changes):
    doc = json.loads((ckpt / "checkpoint.json").read_text())
    doc.update(changes)
    if "n_steps" in changes:
        doc["trainer"]["n_steps"] = changes["n_steps"]
    (ckpt / "checkpoint.json").write_text(json.dumps(doc))


def _forge_tensors(ckpt, edit, steps=None):
    tensors = load_file(str(ckpt / "checkpoint.safetensors"))
    edit(tensors)
    meta = {"n_steps": str(steps if steps is not None else 50)}
    save_file(tensors, str(ckpt / "checkpoint.safetensors"), metadata=meta)


def _huge(t):
    t["model.W_enc"] = torch.zeros(16, 64 * 4096)


HOSTILE = {
    "steps 10**9": lambda c: (_forge_state(c, n_steps=10 ** 9),
                              _forge_tensors(c, lambda t: None, 10 ** 9)),
    "steps -5": lambda c: (_forge_state(c, n_steps=-5), _forge_tensors(c, lambda t: None, -5)),
    "steps 1e300": lambda c: _forge_state(c, n_steps=1e300),
    "rows_seen negative": lambda c: _forge_state(c, rows_seen=-1),
    "seconds NaN": lambda c: (c / "checkpoint.json").write_text(
        (c / "checkpoint.json").read_text().replace('"seconds": ', '"seconds": NaN, "x": ')),
    "oversized tensor": lambda c: _forge_tensors(c, _huge),
    "wrong shape": lambda c: _forge_tensors(
        c, lambda t: t.update({"model.W_dec": torch.zeros(65, 16)})),
    "wrong dtype": lambda c: _forge_tensors(
        c, lambda t: t.update({"steps_since_fired": t["steps_since_fired"].float()})),
    "extra tensor": lambda c: _forge_tensors(c, lambda t: t.update({"x": torch.zeros(3)})),
    "NaN weights": lambda c: _forge_tensors(
        c, lambda t: t["model.W_enc"].fill_(float("nan"))),
    "negative dead counters": lambda c: _forge_tensors(
        c, lambda t: t["steps_since_fired"].fill_(-(2 ** 40))),
    "losses of another length": lambda c: _forge_tensors(
        c, lambda t: t.update({"losses": torch.zeros(10 ** 6)})),
    "truncated tensors": lambda c: (c / "checkpoint.safetensors").write_bytes(
        (c / "checkpoint.safetensors").read_bytes()[:100]),
    "state not JSON": lambda c: (c / "checkpoint.json").write_text("{not json"),
    "state a list": lambda c: (c / "checkpoint.json").write_text("[1, 2]"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_hostile_checkpoint_is_set_aside_and_the_fit_starts_afresh(store, tmp_path,
                                                                     planted_checkpoint, attack,
                                                                     caplog):
    """Before: 10**9 steps skipped batches for hours, -5 crashed, an oversized tensor was
    allocated whole.  Now the header is checked first; the checkpoint is renamed
    ``*.rejected-*`` with a warning and the fit trains all its steps from 0."""
    HOSTILE[attack](planted_checkpoint)
    spec_doc = (planted_checkpoint / "checkpoint.json").read_text()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mechray.analysis.sae.checkpoint"):
        r = _fit(store, tmp_path, steps=100, checkpoint_every=50)
    assert time.monotonic() - t0 < 60
    if attack in ("state a list",):        # not this spec's checkpoint: ignored, left alone
        assert r["train"]["resumed_from_step"] is None
        return
    assert r["train"]["resumed_from_step"] is None and r["train"]["steps"] == 100, attack
    assert r["explained_variance"] > 0.3
    assert "set aside" in caplog.text, (attack, caplog.text)
    [aside] = tmp_path.glob("sae/checkpoints/src-*.rejected-*")
    assert (aside / "checkpoint.json").read_text() == spec_doc   # kept for inspection
    assert not planted_checkpoint.exists()                      # the finished fit removed its own


def test_a_fifo_or_a_link_in_place_of_a_checkpoint_is_never_opened(store, tmp_path,
                                                                   planted_checkpoint):
    (planted_checkpoint / "checkpoint.safetensors").unlink()
    os.mkfifo(planted_checkpoint / "checkpoint.safetensors")
    r = _fit(store, tmp_path, steps=100, checkpoint_every=50)      # would block reading a FIFO
    assert r["train"]["resumed_from_step"] is None and r["train"]["steps"] == 100


def test_a_genuine_checkpoint_still_resumes(store, tmp_path, planted_checkpoint):
    r = _fit(store, tmp_path, steps=100, checkpoint_every=50)
    assert r["train"]["resumed_from_step"] == 50 and r["train"]["steps"] == 100
