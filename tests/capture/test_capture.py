"""ActivationSampler / MechIntHooks: layer resolution, what a hook keeps, bounds, removal."""

import pytest
import torch
from torch import nn

from mechray import ActivationSampler, MechIntConfig, MechIntHooks, ShardStore, UnknownLayerError


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_unknown_layer_names_close_matches(tiny_net, tmp_path):
    sampler = ActivationSampler(layers=["mamba_backbone.block.2"], save_dir=tmp_path, use_ray=False)
    with pytest.raises(UnknownLayerError) as info:
        sampler.register_hooks(tiny_net)
    msg = str(info.value)
    assert "'mamba_backbone.block.2'" in msg and "mamba_backbone.blocks.2" in msg
    assert "named_modules" in msg
    assert _hook_count(tiny_net) == 0


def test_a_bad_name_among_good_ones_leaves_no_hooks(tiny_net, tmp_path):
    sampler = ActivationSampler(layers=["popt", "nope"], save_dir=tmp_path, use_ray=False)
    with pytest.raises(UnknownLayerError):
        sampler.register_hooks(tiny_net)
    assert _hook_count(tiny_net) == 0


def test_globs_and_unique_suffixes(tiny_net, tmp_path):
    wrapper = nn.Module()
    wrapper.model = tiny_net
    sampler = ActivationSampler(layers=["mamba_backbone.blocks.*", "popt"], save_dir=tmp_path,
                                use_ray=False)
    sampler.register_hooks(wrapper)
    assert sampler.layer_names == [f"model.mamba_backbone.blocks.{i}" for i in range(4)] + ["model.popt"]
    sampler.close()
    assert _hook_count(wrapper) == 0


def test_rows_are_flattened_detached_snapshots(tmp_path):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            h.mul_(0).add_(7)  # modifies lin's output after its hook ran
            return h

    model = InPlace()
    x = torch.randn(2, 3, 4)
    expected = model.lin(x).detach().reshape(-1, 4).clone()
    with ActivationSampler(layers=["lin"], save_dir=tmp_path, use_ray=False).attach(model) as s:
        model(x)
        s.save_activations(global_step=5)
    rows = ShardStore(tmp_path).read_layer("lin")
    assert rows.shape == (6, 4) and not rows.requires_grad
    torch.testing.assert_close(rows, expected)


def test_tuple_and_dict_outputs_and_output_keys(tmp_path):
    class Multi(nn.Module):
        def forward(self, x):
            return {"aux": "not a tensor", "main": x * 2, "other": x * 3}

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.multi = Multi()
            self.pair = nn.Identity()

        def forward(self, x):
            out = self.multi(x)
            self.pair((out["other"], out["main"]))
            return out["main"]

    model, x = Wrap(), torch.ones(2, 5)
    s = ActivationSampler(layers=["multi", "pair"], save_dir=tmp_path, use_ray=False,
                          output_keys={"pair": 1})
    s.register_hooks(model)
    model(x)
    s.save_activations(0)
    s.close()
    store = ShardStore(tmp_path)
    torch.testing.assert_close(store.read_layer("multi"), x * 2)   # first tensor of the dict
    torch.testing.assert_close(store.read_layer("pair"), x * 2)    # output_keys picks index 1


class Holder(nn.Module):
    """A model whose only hooked layer is ``lin``."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def test_rows_per_step_is_seeded_and_positions_map_back(tmp_path):
    model = Holder(nn.Linear(3, 4))
    x = torch.randn(10, 8, 3)
    full = model(x).detach().reshape(-1, 4)
    payloads = []
    for run in range(2):
        d = tmp_path / f"run{run}"
        with ActivationSampler(layers=["lin"], save_dir=d, use_ray=False, rows_per_step=16,
                               sample_seed=3).attach(model) as s:
            s.current_step = 11
            model(x)
            s.save_activations(12)
        store = ShardStore(d)
        payloads.append(store.load(store.shards()[0]))
    rows = [p["activations"]["lin"] for p in payloads]
    assert rows[0].shape == (16, 4)
    torch.testing.assert_close(rows[0], rows[1])  # same seed, same rows
    pos = payloads[0]["metadata"]["row_positions"]["lin"]
    torch.testing.assert_close(rows[0], full[pos])
    assert payloads[0]["metadata"]["row_steps"]["lin"].tolist() == [11] * 16
    assert payloads[0]["metadata"]["steps"] == [11]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_downcast_to_storage_dtype(tmp_path, dtype):
    model = Holder(nn.Linear(4, 4))
    x = torch.randn(5, 4)
    with ActivationSampler(layers=["lin"], save_dir=tmp_path, use_ray=False,
                           storage_dtype=dtype).attach(model) as s:
        model(x)
        s.save_activations(0)
    store = ShardStore(tmp_path)
    rows = store.read_layer("lin")
    assert rows.dtype == getattr(torch, dtype)
    assert store.layers()["lin"]["dtype"] == dtype
    torch.testing.assert_close(rows.float(), model(x).detach(), atol=2e-2, rtol=2e-2)


def test_cache_is_bounded_and_keeps_newest_rows(tmp_path):
    holder = Holder(nn.Linear(2, 2))
    lin = holder.lin
    s = ActivationSampler(layers=["lin"], save_dir=tmp_path, use_ray=False,
                          max_activations_per_shard=25)
    s.register_hooks(holder)
    batches = [torch.full((10, 2), float(i)) for i in range(8)]
    for i, b in enumerate(batches):
        s.current_step = i
        lin(b)
        assert sum(len(c.rows) for c in s._cache["lin"]) <= 25 + 10
    assert s.cached_rows == {"lin": 25}
    s.save_activations(7)
    s.close()
    store = ShardStore(tmp_path)
    payload = store.load(store.shards()[0])
    rows, meta = payload["activations"]["lin"], payload["metadata"]
    assert rows.shape == (25, 2)
    expected = torch.cat([lin(b) for b in batches]).detach()[-25:]
    torch.testing.assert_close(rows, expected)
    assert meta["row_steps"]["lin"].tolist() == [5] * 5 + [6] * 10 + [7] * 10
    assert meta["layers"]["lin"]["dropped_rows"] == 80 - 25


def test_rows_cut_by_the_cap_are_warned_once_per_layer_per_shard(tmp_path, caplog,
                                                                  monkeypatch):
    """The cap's drop is said at the save that loses the rows (count, setting, fix), once per
    layer per shard; within a minute the next shards' drops wait for the next warning."""
    import mechray.capture.sampler as sampler_mod

    holder = Holder(nn.Linear(2, 2))
    with MechIntHooks({"sample_layers": ["lin"], "storage_path": str(tmp_path), "use_ray": False,
                       "max_activations_per_shard": 25}).attach(holder) as hooks:
        with caplog.at_level("WARNING", logger="mechray.capture.sampler"):
            holder.lin(torch.zeros(70, 2))         # one forward past the cap: 45 rows cut
            holder.lin(torch.zeros(10, 2))
            hooks.save_activations(0)
            first = [r.getMessage() for r in caplog.records]
            caplog.clear()
            holder.lin(torch.zeros(30, 2))         # 5 more cut, within the minute: held back
            hooks.save_activations(1)
            assert not caplog.records
            holder.lin(torch.zeros(20, 2))         # under the cap: nothing to say
            hooks.save_activations(2)
            assert not caplog.records
            monkeypatch.setattr(sampler_mod, "DROP_WARN_SECONDS", 0.0)
            holder.lin(torch.zeros(27, 2))
            hooks.save_activations(3)
            later = [r.getMessage() for r in caplog.records]
    assert len(first) == 1, first
    assert "lin dropped 55 of 80 rows" in first[0] and "step 0" in first[0]
    assert "max_activations_per_shard=25" in first[0]
    assert "raise max_activations_per_shard" in first[0]
    assert len(later) == 1 and "dropped 2 of 27" in later[0]
    assert "and 5 rows in 1 earlier shard(s)" in later[0]


def test_hooks_removed_on_exception_inside_attach(tiny_net, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with MechIntHooks({"sample_layers": ["popt"], "storage_path": str(tmp_path),
                           "use_ray": False}).attach(tiny_net):
            assert _hook_count(tiny_net) == 2    # the layer's, and the root's mask reader
            raise RuntimeError("boom")
    assert _hook_count(tiny_net) == 0


def test_save_with_nothing_captured_returns_none(tiny_net, tmp_path):
    s = ActivationSampler(layers=["popt"], save_dir=tmp_path, use_ray=False)
    s.register_hooks(tiny_net)
    assert s.save_activations(0) is None
    s.close()
    assert not list(tmp_path.glob("*.pt"))


def test_sampler_accepts_config_fields_or_config(tmp_path):
    config = MechIntConfig(sample_layers=["popt"], storage_path=str(tmp_path), rows_per_step=3)
    assert ActivationSampler(config=config).config.rows_per_step == 3
    s = ActivationSampler(config=config, max_activations_per_shard=7)
    assert s.config.max_activations_per_shard == 7 and s.config.sample_layers == ["popt"]
    with pytest.raises(ValueError, match="max_activations_per_shard"):
        ActivationSampler(layers=["popt"], max_activations_per_shard=0)


def test_hooks_on_something_that_is_not_a_module_say_so(tmp_path):
    from mechray import ActivationSampler

    sampler = ActivationSampler(layers=["popt"], save_dir=str(tmp_path), use_ray=False)
    with pytest.raises(TypeError, match="torch.nn.Module, got dict.*not its tokenizer"):
        sampler.register_hooks({"input_ids": None})
