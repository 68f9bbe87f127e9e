"""The CUDA capture path (pinned host buffers, a side stream, events). Skipped without a GPU."""

import pytest
import torch
from torch import nn

from mechray import ActivationSampler, ShardStore

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(256, 512)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.lin(x))


@pytest.mark.parametrize("rows_per_step, dtype", [(None, "float32"), (100, "bfloat16")])
def test_cuda_rows_match_a_cpu_copy_without_syncing(tmp_path, rows_per_step, dtype):
    torch.manual_seed(0)
    model = Net().cuda()
    xs = [torch.randn(8, 64, 256, device="cuda") for _ in range(3)]
    s = ActivationSampler(layers=["lin", "act"], save_dir=str(tmp_path), use_ray=False,
                          rows_per_step=rows_per_step, storage_dtype=dtype)
    s.register_hooks(model)
    expected = []
    for step, x in enumerate(xs):
        s.current_step = step
        torch.cuda.set_sync_debug_mode("error")  # any device sync on this thread raises
        try:
            out = model(x)
            out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected.append(model.lin(x).detach().reshape(-1, 512))
    s.save_activations(2)
    s.close()
    payload = ShardStore(tmp_path).load("activations_shard_000000_step_2.pt")
    rows = payload["activations"]["lin"]
    assert rows.device.type == "cpu" and rows.dtype == getattr(torch, dtype)
    full = torch.cat(expected).cpu()
    if rows_per_step is None:
        torch.testing.assert_close(rows.float(), full, atol=1e-2 if dtype != "float32" else 1e-5,
                                   rtol=1e-2)
    else:
        steps = payload["metadata"]["row_steps"]["lin"]
        pos = payload["metadata"]["row_positions"]["lin"]
        picked = torch.stack([expected[s][p].cpu() for s, p in zip(steps.tolist(), pos.tolist())])
        torch.testing.assert_close(rows.float(), picked, atol=2e-2, rtol=2e-2)
