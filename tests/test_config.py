"""MechIntConfig: the seed's defaults, construction from dict/YAML, and errors that say the fix."""

import json

import pytest

from mechray import ConfigError, MechIntConfig


def test_seed_defaults():
    c = MechIntConfig(sample_layers=["layer1"])
    assert c.save_hidden_every_n_steps == 200
    assert c.storage_backend == "local"
    assert c.storage_path == "./mechint_cache"
    assert c.analyses_to_run == ["sae", "neuron"]
    assert c.max_activations_per_shard == 10000
    assert c.verbose is True
    assert c.s3_bucket is None
    assert c.storage_dtype == "float32"


def test_seed_cheat_sheet_fields_are_accepted():
    c = MechIntConfig(sample_layers=["layer1", "layer2"], save_hidden_every_n_steps=200,
                      storage_backend="local", storage_path="./mechint_cache",
                      analyses_to_run=["sae", "neuron"], s3_bucket="my-bucket",
                      s3_prefix="exp001/activations", max_activations_per_shard=10000,
                      verbose=True)
    assert c.s3_prefix == "exp001/activations"


def test_from_dict_and_yaml(tmp_path):
    data = {"sample_layers": ["popt"], "storage_dtype": "bfloat16", "rows_per_step": 64,
            "analysis_params": {"sae": {"k": 16}}}
    path = tmp_path / "mechint.yaml"
    path.write_text("sample_layers: [popt]\nstorage_dtype: bfloat16\nrows_per_step: 64\n"
                    "analysis_params:\n  sae: {k: 16}\n")
    assert MechIntConfig.from_dict(data) == MechIntConfig.from_yaml(path)
    assert MechIntConfig.from_yaml(path).params_for("sae") == {"k": 16}


def test_to_dict_is_json_and_round_trips():
    c = MechIntConfig(sample_layers=["a"], storage_backend="both", s3_bucket="b",
                      s3_endpoint_url="http://127.0.0.1:9000")
    d = json.loads(json.dumps(c.to_dict()))
    assert MechIntConfig.from_dict(d) == c
    assert not any("secret" in k or "key_id" in k for k in d)


@pytest.mark.parametrize("fields, must_say", [
    ({"sample_layers": []}, ["sample_layers is empty", "named_modules"]),
    ({"sample_layers": ["a"], "storage_backend": "s4"}, ["storage_backend='s4'", "did you mean 's3'"]),
    ({"sample_layers": ["a"], "storage_backend": "s3"}, ["needs s3_bucket", "s3_bucket='my-bucket'"]),
    ({"sample_layers": ["a"], "storage_backend": "both"}, ["needs s3_bucket"]),
    ({"sample_layers": ["a"], "save_hidden_every_n_steps": 0}, ["save_hidden_every_n_steps=0", ">= 1"]),
    ({"sample_layers": ["a"], "max_activations_per_shard": -5}, ["max_activations_per_shard=-5"]),
    ({"sample_layers": ["a"], "num_writers": 0}, ["num_writers=0"]),
    ({"sample_layers": ["a"], "rows_per_step": 0}, ["rows_per_step=0"]),
    ({"sample_layers": ["a"], "analyses_to_run": ["neurons"]}, ["'neurons'", "did you mean 'neuron'"]),
    ({"sample_layers": ["a"], "sample_layer": ["b"]}, ["unknown field 'sample_layer'", "sample_layers"]),
    ({"sample_layers": ["a"], "storage_dtype": "float8"}, ["storage_dtype='float8'"]),
    ({"save_hidden_every_n_steps": 10}, ["sample_layers is required"]),
    ({"sample_layers": ["a", "a"]}, ["more than once"]),
    ({"sample_layers": ["a"], "s3_endpoint_url": "http://user:pw@127.0.0.1:9000"}, ["credentials"]),
])
def test_errors_name_field_and_fix(fields, must_say):
    with pytest.raises(ConfigError) as info:
        MechIntConfig(**fields)
    for text in must_say:
        assert text in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        MechIntConfig(sample_layers=[])


def test_endpoint_from_environment(monkeypatch):
    c = MechIntConfig(sample_layers=["a"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    assert c.endpoint_url == "http://127.0.0.1:1111"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2222")
    assert c.endpoint_url == "http://127.0.0.1:2222"
    c2 = MechIntConfig(sample_layers=["a"], s3_endpoint_url="http://127.0.0.1:3333")
    assert c2.endpoint_url == "http://127.0.0.1:3333"


def test_building_a_config_does_no_io(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    MechIntConfig(sample_layers=["a"], storage_path="never_made")
    assert not (tmp_path / "never_made").exists()
