"""One validated configuration object for capture, storage, transport and analysis.

Usage::

    from mechray import MechIntConfig

    config = MechIntConfig(sample_layers=["mamba_backbone.blocks.3", "popt"],
                           save_hidden_every_n_steps=200)
    config = MechIntConfig.from_dict({"sample_layers": ["layer1"]})
    config = MechIntConfig.from_yaml("mechint.yaml")
    config.to_dict()          # JSON-safe, no secrets: this is what the manifest records

Validation happens here and only here; building a config does no I/O.  Every error names the
field, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mechray.errors import ConfigError

BACKENDS = ("local", "s3", "both")
DTYPES = ("float32", "float16", "bfloat16")



class MechIntConfig(BaseModel):
    """Everything mechray needs to capture, store and analyse activations.

    The seed quick reference's fields keep their names and defaults; the rest are what running on
    a cluster needs.  ``analysis_params`` holds one dict per analysis (``{"sae": {"k": 32}}``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    # --- the seed's fields -------------------------------------------------------------------
    sample_layers: list[str] = Field(description="module names from model.named_modules(), or globs")
    save_hidden_every_n_steps: int = Field(200, description="capture on steps where step % n == 0")
    storage_backend: Literal["local", "s3", "both"] = "local"
    storage_path: str = "./mechint_cache"
    analyses_to_run: list[str] = Field(default_factory=lambda: ["sae", "neuron"])
    s3_bucket: Optional[str] = None
    s3_prefix: str = "mechint"
    max_activations_per_shard: int = Field(10000, description="rows kept per layer per shard")
    verbose: bool = True

    # --- S3 ------------------------------------------------------------------------------------
    s3_endpoint_url: Optional[str] = Field(
        None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    s3_region: Optional[str] = None
    s3_multipart_threshold_mb: int = 64
    s3_checksum_algorithm: Optional[Literal["CRC32", "CRC32C", "SHA256", "SHA1"]] = Field(
        "CRC32", description="checksum boto3 sends with every upload and S3 verifies before "
                             "storing it (CRC32C needs `pip install botocore[crt]`); None for "
                             "S3-compatible stores that refuse checksum headers")
    s3_retry_seconds: float = Field(
        60.0, description="the S3 outage budget: how long the run waits for a down (or silent) "
                          "endpoint, once per outage, before shards are left in the local "
                          "spool, marked pending_upload (see `mechray sync`); it also sets the "
                          "S3 clients' connect/read timeouts")
    s3_append: bool = Field(
        False, description="when s3_prefix already holds another run's store: False refuses "
                           "to start (naming it); True adds to that store, numbering shards "
                           "after its own")

    # --- capture -------------------------------------------------------------------------------
    storage_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    rows_per_step: Optional[int] = Field(
        None, description="rows sampled per layer per forward call (seeded); None keeps all")
    sample_seed: int = 0
    output_keys: dict[str, Union[int, str]] = Field(
        default_factory=dict, description="layer -> tuple index or dict key of the tensor to keep")
    save_inputs: bool = Field(False, description="store each sampled step's model input too")
    mask_key: Optional[str] = Field(
        "attention_mask", description="keyword argument (or batch key, for MechIntCallback) "
                                      "holding the [batch, seq] mask of real tokens; only "
                                      "those positions are stored. None: store every position")
    token_ids_key: Optional[str] = Field(
        "input_ids", description="keyword argument / batch key of the token ids stored with "
                                 "each row (provenance, token contexts)")
    exclude_special_tokens: bool = Field(
        True, description="leave rows of special tokens ([CLS], [SEP], BOS, EOS, PAD) out of "
                          "capture and analysis: the ids in special_token_ids, else the "
                          "all_special_ids of the tokenizer given to MechIntHooks / "
                          "ActivationSampler / MechIntCallback / EvalMechIntRunner (needs "
                          "each row's token id)")
    special_token_ids: Optional[list[int]] = Field(
        None, description="token ids left out when exclude_special_tokens; None: the "
                          "tokenizer's all_special_ids (no tokenizer: none)")
    steps_per_shard: Optional[int] = Field(
        None, description="sampled steps gathered into one shard by MechIntCallback (cut earlier "
                          "when max_activations_per_shard would be exceeded). None: gather by "
                          "size and time (shard_target_mb, shard_max_seconds)")
    shard_target_mb: float = Field(
        32.0, gt=0, description="steps_per_shard=None: MechIntCallback gathers the rows of "
                                "consecutive sampled steps into one shard until it holds this "
                                "many MB (or max_activations_per_shard rows per layer)")
    shard_max_seconds: float = Field(
        10.0, ge=0, description="steps_per_shard=None: rows wait at most this long for more "
                                "steps before their shard is handed to a writer; sampled steps "
                                "further apart than this get a shard each. 0: a shard per step")

    # --- transport -----------------------------------------------------------------------------
    use_ray: Optional[bool] = Field(None, description="None: use Ray when ray.is_initialized()")
    num_writers: int = 2
    max_shards_in_flight: int = 4
    writer_num_cpus: float = 0.0
    ray_namespace: str = "mechray"
    run_id: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="the writing run's id; a store has one writing run at a time. None: a new "
                    "id per run (shared by its ranks); give the old run's id to resume it")
    checksum: Literal["crc32c", "sha256"] = Field(
        "crc32c", description="each shard's checksum in the manifest, computed while it is "
                              "written and checked on every read: CRC32C (fast) or sha256")
    on_write_error: Literal["raise", "drop"] = Field(
        "raise", description="'raise': keep the failed shard in memory and stop training at the "
                             "next save; 'drop': log loudly, discard the shard, keep training")

    # --- analysis ------------------------------------------------------------------------------
    analysis_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    analysis_layers: Optional[list[str]] = Field(
        None, description="captured layers to analyse; None analyses every captured layer")
    analysis_num_cpus: float = Field(1.0, description="CPUs per Ray analysis task")
    analysis_num_gpus: float = Field(0.0, description="GPUs per Ray fit/model analysis task")
    eval_max_samples: int = Field(256, description="model inputs used by model analyses at most")

    # --- api (mechray.api: the HTTP interpretation API) ---------------------------------------
    api_max_upload_mb: float = Field(64.0, gt=0, le=65536,
                                     description="largest POST /interpret/upload body (else 413)")
    api_max_json_kb: float = Field(64.0, gt=0, le=65536, description="largest JSON request body")
    api_token_env: str = Field("MECHRAY_API_TOKEN", min_length=1,
                               description="env var holding the bearer token; unset: no auth")
    api_job_analyses: list[str] = Field(default_factory=lambda: ["sae"],
                                        description="analyses that always run as jobs (202)")
    api_job_cost: float = Field(2e9, ge=0, description="estimated operations over which a "
                                "request runs as a job instead of answering at once")
    api_max_cost: float = Field(5e13, gt=0, description="estimated operations over which a "
                                "request is refused (422); run `mechray analyze` instead")
    api_max_memory_mb: float = Field(8192.0, gt=0, description="estimated peak memory over "
                                     "which a request is refused (422)")
    api_max_answer_mb: float = Field(64.0, gt=0, description="estimated JSON answer size over "
                                     "which a request is refused (422)")
    api_cache_entries: int = Field(256, ge=0, le=100_000, description="cached results (LRU)")
    api_cache_mb: float = Field(256.0, ge=0, description="bytes the result cache holds at most")
    api_max_concurrent: int = Field(2, ge=1, le=256,
                                    description="analyses computing, and uploads parsing, at once "
                                                "per process/replica")
    api_job_workers: int = Field(1, ge=1, le=64, description="jobs running at once")
    api_max_pending_jobs: int = Field(16, ge=1, le=10_000,
                                      description="queued + running jobs before 429")
    api_job_ttl_s: float = Field(3600.0, gt=0, description="finished jobs are kept this long")
    api_manifest_ttl_s: float = Field(5.0, ge=0, description="S3 stores: list the manifests "
                                      "at most this often to see whether they changed (the "
                                      "manifest is parsed only when it did; local stores are "
                                      "checked by mtime/size on every request)")

    # --- end of the api section ---------------------------------------------------------------

    # ------------------------------------------------------------------------------------------
    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, data)) from None

    @field_validator("sample_layers")
    @classmethod
    def _layers(cls, v: list[str]) -> list[str]:
        if isinstance(v, str):  # pragma: no cover - pydantic rejects str for list already
            v = [v]
        if not v:
            raise ValueError("sample_layers is empty; name at least one module, e.g. "
                             "sample_layers=['mamba_backbone.blocks.3'] (see model.named_modules())")
        bad = [name for name in v if not isinstance(name, str) or not name.strip()]
        if bad:
            raise ValueError(f"sample_layers holds blank names {bad!r}; remove them")
        if len(set(v)) != len(v):
            dup = sorted({n for n in v if v.count(n) > 1})
            raise ValueError(f"sample_layers lists {dup!r} more than once; list each layer once")
        return list(v)

    @field_validator("save_hidden_every_n_steps", "max_activations_per_shard", "num_writers",
                     "max_shards_in_flight", "s3_multipart_threshold_mb", "steps_per_shard",
                     "eval_max_samples")
    @classmethod
    def _positive(cls, v: Optional[int], info) -> Optional[int]:
        if v is None and info.field_name == "steps_per_shard":
            return v
        if v is None or v <= 0:
            raise ValueError(f"{info.field_name}={v!r} must be a positive integer (>= 1)")
        return v

    @field_validator("rows_per_step")
    @classmethod
    def _rows(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v <= 0:
            raise ValueError(f"rows_per_step={v!r} must be >= 1, or None to keep every row")
        return v

    @field_validator("writer_num_cpus", "analysis_num_gpus", "s3_retry_seconds")
    @classmethod
    def _cpus(cls, v: float, info) -> float:
        if v < 0:
            raise ValueError(f"{info.field_name}={v!r} must be >= 0")
        return v

    @field_validator("analysis_num_cpus")
    @classmethod
    def _task_cpus(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"analysis_num_cpus={v!r} must be > 0 (e.g. 1)")
        return v

    @field_validator("analysis_layers")
    @classmethod
    def _analysis_layers(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is not None and not v:
            raise ValueError("analysis_layers is empty; list captured layers, or None for all")
        return v

    @field_validator("analyses_to_run", "api_job_analyses")
    @classmethod
    def _analyses(cls, v: list[str], info) -> list[str]:
        known = _analysis_names()
        for name in v:
            if name not in known:
                raise ValueError(f"{info.field_name} has unknown analysis {name!r}"
                                 f"{_close(name, known)}; valid analyses are {known}")
        return list(dict.fromkeys(v))

    @field_validator("analysis_params")
    @classmethod
    def _params(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = _analysis_names()
        for name in v:
            if name not in known:
                raise ValueError(f"analysis_params has unknown analysis {name!r}"
                                 f"{_close(name, known)}; valid keys are {known}")
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage_path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("storage_path is empty; name the store's directory, e.g. "
                             "'./mechint_cache' (an empty path would write into the current "
                             "directory)")
        return v

    @field_validator("s3_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return v.strip("/")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"s3_endpoint_url={v!r} is not an http(s) URL; "
                             "use e.g. 'http://127.0.0.1:9000'")
        if parts.username or parts.password:
            raise ValueError("s3_endpoint_url must not carry credentials; use the AWS credential "
                             "chain (environment, profile, IAM role) instead")
        return v

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> "MechIntConfig":
        if self.storage_backend in ("s3", "both") and not self.s3_bucket:
            raise ValueError(f"storage_backend={self.storage_backend!r} needs s3_bucket; pass "
                             "s3_bucket='my-bucket' or use storage_backend='local'")
        return self

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MechIntConfig":
        """Build from a plain dict (as the seed's ``MechIntCallback(config={...})`` passes)."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a dict of config fields, got {type(data).__name__}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "MechIntConfig":
        """Build from a YAML file holding a mapping of config fields."""
        import yaml

        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
        return cls(**data)

    @classmethod
    def coerce(cls, config: Union["MechIntConfig", dict[str, Any], None] = None,
               **overrides: Any) -> "MechIntConfig":
        """Accept a config, a dict, or keyword fields, with ``overrides`` applied on top."""
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, cls):
            base = config.model_dump()
        elif isinstance(config, dict):
            base = dict(config)
        else:
            raise ConfigError(f"config must be a MechIntConfig or a dict, got {type(config).__name__}")
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field; no credentials are ever part of a config."""
        data = self.model_dump(mode="json")
        if data.get("s3_endpoint_url"):
            parts = urlsplit(data["s3_endpoint_url"])
            data["s3_endpoint_url"] = urlunsplit(parts._replace(query="", fragment=""))
        return data

    # --- derived values ------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> Optional[str]:
        """The S3 endpoint: the field, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``."""
        return (self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)

    @property
    def local_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve()

    def params_for(self, analysis: str) -> dict[str, Any]:
        return dict(self.analysis_params.get(analysis, {}))


def _close(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(map(repr, match))}?)" if match else ""


def _explain(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    fields = list(MechIntConfig.model_fields)
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][0])
            lines.append(f"unknown field {key!r}{_close(key, fields)}; "
                         f"MechIntConfig fields are {fields}")
        elif err["type"] == "missing":
            lines.append(f"{loc} is required, e.g. MechIntConfig(sample_layers=['layer1'])")
        elif err["type"] == "literal_error":
            allowed = {"storage_backend": BACKENDS, "storage_dtype": DTYPES}.get(loc, ())
            bad = str(err.get('input'))
            lines.append(f"{loc}={err.get('input')!r} is not allowed{_close(bad, allowed)}; "
                         f"{msg}")
        elif not err["loc"] or loc in msg:
            lines.append(msg)
        else:
            lines.append(f"{loc}={err.get('input')!r}: {msg}")
    return "invalid MechIntConfig: " + "; ".join(lines)


def _analysis_names() -> list[str]:
    """The registered analyses (the registry is the one list; imported here, not at the top, so
    that the config module stays importable without the analysis package loaded)."""
    from mechray.analysis.base import analysis_names

    return analysis_names()
