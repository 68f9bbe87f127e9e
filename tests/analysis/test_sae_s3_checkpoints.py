"""SAE checkpoints on S3 (moto's ThreadedMotoServer over HTTP on 127.0.0.1).

With a store on S3 the checkpoints go to ``s3://<bucket>/<prefix>.checkpoints`` (every node and
a rerun reach them, no shared disk), or to an ``s3://`` ``checkpoint_dir``; a killed fit resumes
from them.  Ray Train's checkpoints go to the same prefix through pyarrow's S3 filesystem.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import boto3
import pytest
import torch
from torch import nn

from mechray.analysis.engine import Engine
from mechray.analysis.sae.train import SAETrainer
from mechray.capture.sampler import ActivationSampler
from mechray.storage.reader import ShardStore
from mechray.testing import planted_dictionary

# Ray Train fits of this module run on one xdist worker, one after another: two at once on
# two cores (plus the rest of the suite) can outlast Ray Train's worker-group start-up
pytestmark = pytest.mark.xdist_group("ray_train")

PARAMS = {"n_latents": 64, "k": 3, "batch_size": 128, "lr": 3e-3, "steps": 60, "device": "cpu",
          "top_latents": 0, "checkpoint_every": 25}


def s3_store(tmp_path, endpoint: str, bucket: str, rows: int = 3000) -> ShardStore:
    _, x = planted_dictionary(16, 32, 3, rows, seed=0)
    model = nn.Sequential(OrderedDict(src=nn.Identity()))
    sampler = ActivationSampler(layers=["src"], save_dir=str(tmp_path / "local"), use_ray=False,
                                verbose=False, max_activations_per_shard=1000,
                                storage_backend="s3", s3_bucket=bucket, s3_prefix="run",
                                s3_endpoint_url=endpoint)
    sampler.register_hooks(model)
    for step, chunk in enumerate(x.split(1000)):
        model(chunk)
        sampler.save_activations(step)
    sampler.close()
    return ShardStore(f"s3://{bucket}/run", endpoint_url=endpoint,
                      cache_dir=str(tmp_path / "cache"))


def keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket,
                                                                       Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.mark.parametrize("where", [None, "s3://{bucket}/elsewhere"])
def test_a_killed_fit_resumes_from_its_checkpoint_on_s3(s3_bucket, tmp_path, monkeypatch,
                                                        where):
    """Killed at step 40: the step-25 checkpoint is on S3 (the store's ``.checkpoints``
    sibling prefix by default, or the given ``s3://`` checkpoint_dir), none on local disk; the
    rerun resumes from it and trains the uninterrupted SAE; the objects are gone after."""
    endpoint, bucket = s3_bucket
    torch.set_num_threads(1)
    store = s3_store(tmp_path, endpoint, bucket)
    ckpt_dir = None if where is None else where.format(bucket=bucket)
    prefix = "run.checkpoints/" if where is None else "elsewhere/"
    whole = Engine(store, use_ray=False, progress=False, out_dir=tmp_path / "whole",
                   checkpoint_dir=ckpt_dir).run(["sae"], {"sae": PARAMS})["sae"]["src"]
    assert whole["train"]["resumed_from_step"] is None
    real = SAETrainer.step

    def dying(self, x):
        if self.n_steps == 40:
            raise RuntimeError("killed")
        return real(self, x)

    monkeypatch.setattr(SAETrainer, "step", dying)
    with pytest.raises(RuntimeError, match="killed"):
        Engine(store, use_ray=False, progress=False, strict=True, out_dir=tmp_path / "cut",
               checkpoint_dir=ckpt_dir).run(["sae"], {"sae": PARAMS})
    monkeypatch.setattr(SAETrainer, "step", real)
    saved = keys(endpoint, bucket, prefix)
    assert [k.rsplit("/", 1)[-1] for k in saved] == ["checkpoint.json", "checkpoint.safetensors"]
    assert saved[0].startswith(f"{prefix}sae/checkpoints/src-")
    assert not list((tmp_path / "cut").glob("sae/checkpoints/*"))     # nothing local
    again = Engine(store, use_ray=False, progress=False, out_dir=tmp_path / "cut",
                   checkpoint_dir=ckpt_dir).run(["sae"], {"sae": PARAMS})["sae"]["src"]
    assert again["train"]["resumed_from_step"] == 25 and again["train"]["steps"] == 60
    assert again["explained_variance"] == pytest.approx(whole["explained_variance"], abs=1e-6)
    torch.testing.assert_close(torch.tensor(again["train"]["loss_curve"]),
                               torch.tensor(whole["train"]["loss_curve"]), rtol=0, atol=1e-6)
    assert keys(endpoint, bucket, prefix) == []


def test_an_oversized_checkpoint_on_s3_is_not_downloaded(s3_bucket, tmp_path, monkeypatch,
                                                          caplog):
    """A checkpoint object bigger than this SAE's tensors could be (a planted 8 MB one) is
    refused before it is fetched: the fit starts afresh, with a warning naming the size."""
    endpoint, bucket = s3_bucket
    store = s3_store(tmp_path, endpoint, bucket)
    real = SAETrainer.step

    def dying(self, x):
        if self.n_steps == 30:
            raise RuntimeError("killed")
        return real(self, x)

    monkeypatch.setattr(SAETrainer, "step", dying)
    with pytest.raises(RuntimeError, match="killed"):
        Engine(store, use_ray=False, progress=False, strict=True).run(["sae"], {"sae": PARAMS})
    monkeypatch.setattr(SAETrainer, "step", real)
    [tensors] = [k for k in keys(endpoint, bucket, "run.checkpoints/") if k.endswith("tensors")]
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=tensors,
                                                         Body=b"\0" * (8 << 20))
    with caplog.at_level("WARNING"):
        r = Engine(store, use_ray=False, progress=False).run(["sae"], {"sae": PARAMS})["sae"]
    assert r["src"]["train"]["resumed_from_step"] is None and r["src"]["train"]["steps"] == 60
    assert "8388608 bytes, more than the" in caplog.text


@pytest.fixture
def ray2():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_failed_ray_train_fit_resumes_from_its_checkpoint_on_s3(s3_bucket, tmp_path, ray2):
    """Ray Train on a store on S3 keeps its checkpoints under the store's ``.checkpoints``
    prefix (pyarrow's S3 filesystem, the store's endpoint): a worker killed once a checkpoint
    is registered fails the fit (``max_failures=0``, as a killed ``mechray analyze`` stops);
    the same fit again resumes from S3 and removes the checkpoints when done."""
    import ray.train

    from mechray.analysis import Context, get_analysis

    endpoint, bucket = s3_bucket
    store = s3_store(tmp_path, endpoint, bucket, rows=4000)
    params = {**PARAMS, "num_workers": 2, "steps": 300, "checkpoint_every": 50,
              "max_failures": 0}
    killed: list[int] = []
    thread = threading.Thread(target=_kill_a_worker_after_a_checkpoint,
                              args=(endpoint, bucket, killed), daemon=True)
    thread.start()
    with pytest.raises(ray.train.TrainingFailedError):
        get_analysis("sae", params).fit(Context(store=store, out_dir=tmp_path / "o"), "src")
    thread.join(5)
    assert killed
    assert any(k.endswith("checkpoint.safetensors")
               for k in keys(endpoint, bucket, "run.checkpoints/sae/ray_train/"))
    again = get_analysis("sae", params).fit(Context(store=store, out_dir=tmp_path / "o"), "src")
    assert again["train"]["resumed_from_step"] in range(50, 300, 50)
    assert again["explained_variance"] > 0.5
    assert not [k for k in keys(endpoint, bucket, "run.checkpoints/sae/ray_train/")
                if "checkpoint" in k.rsplit("/", 1)[-1] and k.endswith(".safetensors")]


def _kill_a_worker_after_a_checkpoint(endpoint: str, bucket: str, killed: list[int]) -> None:
    """SIGKILL one Ray Train worker of this test's Ray once Ray Train's snapshot (a registered
    checkpoint) is on S3."""
    import psutil

    deadline = time.monotonic() + 240
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and not killed:
        if not workers:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        workers.append(proc)
                except psutil.Error:
                    continue
        elif any(k.endswith("checkpoint_manager_snapshot.json")
                 for k in keys(endpoint, bucket, "run.checkpoints/sae/ray_train/")):
            workers[-1].kill()
            killed.append(workers[-1].pid)
        time.sleep(0.05)
