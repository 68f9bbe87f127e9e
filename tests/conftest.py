"""Shared fixtures: a real local Ray, a real HTTP S3 server (moto), tiny models.

Every service is real and local: Ray on 127.0.0.1 without a dashboard, moto's
``ThreadedMotoServer`` on 127.0.0.1 with a free port reached through boto3.
"""

from __future__ import annotations

import os
import time
import uuid

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train gives a worker group 60 s to start; two workers importing torch on a loaded 2-core
# machine beside the rest of the suite can take longer (inherited by Ray's processes)
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# The test S3 server accepts any credentials; set them before Ray starts so actors inherit them.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_api_token_in_the_environment():
    """API auth is off unless a test turns it on (a developer's own MECHRAY_API_TOKEN is hidden)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MECHRAY_API_TOKEN", raising=False)
        yield


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for one test module (shut down after it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the test server; yields ``(endpoint, bucket)``."""
    import boto3

    name = f"mechray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name


class TinyNet(nn.Module):
    """Named like the seed's layers, small enough for unit tests: [B, T, 6] -> [B, T, 3]."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.mamba_backbone = nn.Module()
        self.mamba_backbone.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh())
                                                   for _ in range(4))
        self.popt = nn.Linear(d, d)
        self.heads = nn.ModuleDict({"decoder": nn.Linear(d, 3)})

    def forward(self, x):
        h = self.embed(x)
        for block in self.mamba_backbone.blocks:
            h = h + block(h)
        return self.heads["decoder"](self.popt(h))


def capture_tiny(path, layers, steps=(0, 1, 2), batch=(4, 5, 6), seed=0, **sampler_kw):
    """A TinyNet's activations for ``steps`` stored at ``path`` in one process; returns the net."""
    from mechray import ActivationSampler

    torch.manual_seed(seed)
    net = TinyNet()
    sampler = ActivationSampler(layers=layers, save_dir=str(path), use_ray=False, verbose=False,
                                **sampler_kw)
    sampler.register_hooks(net)
    g = torch.Generator().manual_seed(seed)
    for step in steps:
        sampler.current_step = step
        with torch.no_grad():
            net(torch.randn(*batch, generator=g))
        sampler.save_activations(step)
    sampler.close()
    return net


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture(scope="module")
def ray_three_nodes():
    """A real 3-node Ray cluster on this machine (head + 2 workers, each its own raylet)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    deadline = time.monotonic() + 60  # until the scheduler sees every node's CPUs
    while ray.cluster_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    # and until every node runs a task: a raylet still starting its first worker can make soft
    # node affinity (how writers spread) fall back to another node on a loaded machine
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    probes = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
              .remote() for n in nodes]
    assert sorted(ray.get(probes, timeout=120)) == sorted(nodes)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()
