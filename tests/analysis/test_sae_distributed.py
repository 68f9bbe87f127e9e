"""``sae`` with ``num_workers=2``: one SAE trained data-parallel on Ray Train (gloo, CPU).

The same planted dictionary (``mechray.testing.planted_dictionary``) is trained in one process
and on 2 Ray Train workers, from a local store and from S3 (moto over HTTP on 127.0.0.1), with
the same budget; both recover the dictionary, and the EV / L0 agree to the tolerance the module
states.  A worker killed midway (``ray.kill`` of its actor) costs a restart from the last
checkpoint, not the fit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mechray.analysis import Context, get_analysis
from mechray.analysis.base import AnalysisParamsError
from mechray.analysis.sae.model import load_sae
from mechray.capture.sampler import ActivationSampler
from mechray.storage.reader import ShardStore
from mechray.testing import planted_dictionary, recovered_score, rows_store

# Ray Train fits of this module run on one xdist worker, one after another: two at once on
# two cores (plus the rest of the suite) can outlast Ray Train's worker-group start-up
pytestmark = pytest.mark.xdist_group("ray_train")

PARAMS = {"n_latents": 128, "k": 3, "batch_size": 256, "lr": 4e-3, "steps": 500,
          "device": "cpu", "top_latents": 0, "checkpoint_every": 100}


write_store = rows_store

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.set_num_threads(1)
    dictionary, x = planted_dictionary(32, 64, 3, 8000, seed=0)
    return write_store(tmp_path_factory.mktemp("dist_store"), x), dictionary, x


@pytest.fixture(scope="module")
def ray2():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def fit(store, out, **params):
    r = get_analysis("sae", {**PARAMS, **params}).fit(Context(store=store, out_dir=out), "src")
    return r, load_sae(out / r["weights_path"])


@pytest.fixture(scope="module")
def single(planted, tmp_path_factory):
    store, dictionary, _ = planted
    return fit(store, tmp_path_factory.mktemp("single"))


def _agree(one, many, dictionary):
    (r1, sae1), (r2, sae2) = one, many
    assert recovered_score(dictionary, sae1.W_dec) >= 0.95
    assert recovered_score(dictionary, sae2.W_dec) >= 0.95
    assert r2["explained_variance"] == pytest.approx(r1["explained_variance"], abs=0.01)
    assert r2["l0"] == pytest.approx(r1["l0"], rel=0.05)
    assert r2["train"]["steps"] == r1["train"]["steps"] == PARAMS["steps"]
    assert r2["train"]["workers"] == 2 and r2["train"]["rows_seen"] == r1["train"]["rows_seen"]


@pytest.mark.slow
def test_two_ray_train_workers_train_the_single_process_sae_from_a_local_store(
        planted, single, ray2, tmp_path):
    store, dictionary, _ = planted
    many = fit(store, tmp_path, num_workers=2)
    _agree(single, many, dictionary)
    assert many[0]["train"]["resumed_from_step"] is None
    assert not list(tmp_path.glob("sae/ray_train/src-*"))        # removed when done


@pytest.mark.slow
def test_two_ray_train_workers_stream_the_shards_from_s3(planted, single, ray2, s3_bucket,
                                                         tmp_path):
    store, dictionary, x = planted
    endpoint, bucket = s3_bucket
    write_store(tmp_path / "local", x, storage_backend="s3", s3_bucket=bucket,
                s3_prefix="dist", s3_endpoint_url=endpoint)
    s3 = ShardStore(f"s3://{bucket}/dist", endpoint_url=endpoint,
                    cache_dir=str(tmp_path / "cache"))
    many = fit(s3, tmp_path / "out", num_workers=2)
    _agree(single, many, dictionary)


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(planted, single, ray2, tmp_path):
    """SIGKILL of one training worker's process once a checkpoint is registered: the group
    restarts (FailureConfig) from the last one and ends with the uninterrupted fit's quality."""
    store, dictionary, _ = planted
    killed: list[int] = []
    thread = threading.Thread(target=_kill_a_worker, args=(tmp_path, killed), daemon=True)
    thread.start()
    many = fit(store, tmp_path, num_workers=2, checkpoint_every=50)
    thread.join(5)
    assert killed, "no worker was killed"
    assert many[0]["train"]["resumed_from_step"] in range(50, PARAMS["steps"], 50)
    _agree(single, many, dictionary)


def _kill_a_worker(tmp_path, killed: list[int]) -> None:
    """SIGKILL one worker process of this test's Ray (a child of this process: no other Ray on
    the machine is touched) as soon as Ray Train's controller has registered a checkpoint (its
    snapshot file is on disk: a checkpoint reported but not yet registered dies with the
    group); the worker processes are found beforehand, so the kill lands with most of the 500
    steps still to go."""
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
        elif list(tmp_path.glob("sae/ray_train/src-*/checkpoint_manager_snapshot.json")):
            workers[-1].kill()
            killed.append(workers[-1].pid)
        time.sleep(0.02)


@pytest.mark.slow
def test_a_failed_fit_resumes_from_its_ray_train_checkpoint_when_run_again(planted, single,
                                                                           ray2, tmp_path):
    """``max_failures=0``: the killed worker fails the fit (as a killed ``mechray analyze``
    would stop it); the same fit run again resumes from the registered checkpoint in the
    results directory (Ray Train's snapshot there) and ends with the uninterrupted quality."""
    import ray.train

    store, dictionary, _ = planted
    killed: list[int] = []
    thread = threading.Thread(target=_kill_a_worker, args=(tmp_path, killed), daemon=True)
    thread.start()
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        fit(store, tmp_path, num_workers=2, checkpoint_every=50, max_failures=0)
    thread.join(5)
    assert killed, f"the fit failed before a worker was killed: {failed.value}"
    again = fit(store, tmp_path, num_workers=2, checkpoint_every=50, max_failures=0)
    assert again[0]["train"]["resumed_from_step"] in range(50, PARAMS["steps"], 50)
    _agree(single, again, dictionary)


def test_a_batch_that_does_not_split_over_the_workers_is_refused_naming_the_fix(planted, ray2):
    store, _, _ = planted
    with pytest.raises(AnalysisParamsError, match="batch_size divisible"):
        get_analysis("sae", {**PARAMS, "num_workers": 2, "batch_size": 255}).fit(
            Context(store=store), "src")


def test_more_workers_than_the_cluster_has_cpus_is_refused(planted, ray2):
    store, _, _ = planted
    with pytest.raises(AnalysisParamsError, match="needs 8 CPUs but the Ray cluster has 2 besides"):
        get_analysis("sae", {**PARAMS, "num_workers": 2, "cpus_per_worker": 4}).fit(
            Context(store=store), "src")


def test_a_dictionary_that_needs_latent_sharding_is_refused_naming_its_size(tmp_path):
    """d 512 x 256 = 131,072 latents: the error gives the memory per worker and says that
    sharding the latents is not supported yet (before: only 'exceeds 65536')."""
    store = write_store(tmp_path / "wide", torch.randn(40, 512), per_shard=40)
    with pytest.raises(AnalysisParamsError, match=r"d=512 x n_latents=131072 needs ~3\.5 GiB "
                                                  r"per worker .*latents sharded.*not support"):
        get_analysis("sae", {"expansion_factor": 256, "k": 8}).fit(Context(store=store), "src")


def test_the_engine_fit_task_holds_no_cpu_so_its_workers_start(planted, ray2, tmp_path):
    """Through the engine the fit is a Ray task that only waits on its Ray Train workers: it
    holds no CPU (``SAEAnalysis.task_cpus``), so 2 workers start on the 2-CPU cluster.  It held
    1 before, and the layer ended as 'needs 2 CPUs but the cluster has 1 besides this task's'
    (and fits of several layers, each holding a CPU, could starve each other's workers)."""
    from mechray.analysis.engine import Engine

    store, dictionary, _ = planted
    out = Engine(store, use_ray=True, progress=False, out_dir=tmp_path).run(
        ["sae"], {"sae": {**PARAMS, "num_workers": 2}})
    result = out["sae"]["src"]
    assert not result.get("skipped"), result
    assert result["train"]["workers"] == 2, result["train"]
    assert result["explained_variance"] > 0.5


@pytest.mark.slow
def test_a_sweep_on_ray_train_trains_each_setting_as_its_own_ray_train_fit(planted, ray2,
                                                                           tmp_path):
    """``sweep={"k": [3, 6]}`` on 2 workers: one Ray Train run whose workers feed each batch
    to both SAEs; each SAE equals the 2-worker fit of its setting alone (same seed, batches,
    all-reduces) and has its own result and weights (checked for k=6: each Ray Train run costs
    its start-up, and the in-process sweep test checks every setting)."""
    store, _, _ = planted
    short = {"steps": 120, "checkpoint_every": 50, "num_workers": 2}
    swept = get_analysis("sae", {**PARAMS, **short, "sweep": {"k": [3, 6]}}) \
        .fit(Context(store=store, out_dir=tmp_path / "sweep"), "src")
    assert swept["sweep"]["settings"] == ["k=3", "k=6"]
    assert swept["results"]["k=3"]["l0"] < swept["results"]["k=6"]["l0"]
    for k in (6,):
        alone, sae = fit(store, tmp_path / f"k{k}", **short, k=k)
        mine = swept["results"][f"k={k}"]
        assert mine["train"]["workers"] == 2 and mine["train"]["steps"] == 120
        assert mine["train"]["rows_seen"] == alone["train"]["rows_seen"]
        assert mine["explained_variance"] == pytest.approx(alone["explained_variance"], abs=1e-6)
        assert mine["l0"] == pytest.approx(alone["l0"], abs=1e-6)
        other = load_sae(tmp_path / "sweep" / mine["weights_path"])
        for name, tensor in sae.state_dict().items():
            torch.testing.assert_close(other.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "sweep").glob("sae/ray_train/src-*"))


def test_the_engine_trains_two_layers_at_once_on_ray_with_the_results_of_one_at_a_time(
        ray2, tmp_path):
    """Two layers' SAEs through the engine on a 2-CPU Ray: one fit task per layer, both at
    once (each holds one CPU), each with its checkpoint directory; every result and weight
    equals the layer's fit in this process, one layer after the other."""
    from mechray.analysis.engine import Engine

    torch.set_num_threads(1)
    _, x = planted_dictionary(16, 32, 3, 2000, seed=1)
    model = nn.Sequential(OrderedDict(a=nn.Identity(), b=nn.Tanh()))
    sampler = ActivationSampler(layers=["a", "b"], save_dir=str(tmp_path / "store"),
                                use_ray=False, verbose=False, max_activations_per_shard=1000)
    sampler.register_hooks(model)
    for step, chunk in enumerate(x.split(1000)):
        model(chunk)
        sampler.save_activations(step)
    sampler.close()
    store = ShardStore(tmp_path / "store")
    params = {**PARAMS, "n_latents": 64, "batch_size": 128, "steps": 60, "checkpoint_every": 25,
              "top_latents": 2}
    out = Engine(store, use_ray=True, progress=False, out_dir=tmp_path / "ray").run(
        ["sae"], {"sae": params})["sae"]
    for layer in ("a", "b"):
        alone = get_analysis("sae", params).fit(Context(store=store, out_dir=tmp_path / "one"),
                                                layer)
        both = out[layer]
        assert not both.get("skipped"), both
        for key in ("explained_variance", "l0", "dead_fraction", "mse"):
            assert both[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-7), (layer, key)
        assert both["top_activations"]["latents"] == alone["top_activations"]["latents"]
        a = load_sae(tmp_path / "ray" / both["weights_path"])
        b = load_sae(tmp_path / "one" / alone["weights_path"])
        for name, tensor in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    assert out["a"]["explained_variance"] != out["b"]["explained_variance"]
