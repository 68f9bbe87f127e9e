"""Request and response bodies of the interpretation API (they make the OpenAPI schema complete).

Usage::

    from mechray.api.schema import InterpretRequest

    InterpretRequest(analysis_type="neuron", layer_name="popt", params={"top_k": 3})

``POST /interpret`` answers :class:`InterpretResponse` (200) or :class:`JobAccepted` (202, poll
``GET /interpret/jobs/{job_id}`` for a :class:`JobStatus`); ``POST /interpret/upload`` answers
:class:`UploadResponse` or :class:`JobAccepted`; every 4xx is an :class:`ErrorResponse`.
Per-layer results are the analyses' own JSON (see ``mechray/analysis/*.py``); a result with
``"skipped": true`` carries the ``reason`` the analysis could not run.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from mechray.analysis.base import analysis_names

ANALYSIS_EXAMPLES = analysis_names()  # the registry, at import time of the API


class InterpretRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    analysis_type: str = Field(..., min_length=1, max_length=64, examples=ANALYSIS_EXAMPLES,
                               description="a registered analysis: " + ", ".join(ANALYSIS_EXAMPLES))
    layer_name: str = Field(..., min_length=1, max_length=256, examples=["popt"],
                            description="a captured layer (see GET /interpret/layers)")
    params: Optional[dict[str, Any]] = Field(
        None, examples=[{"top_k": 5}],
        description="the analysis's parameters (bounded; see its Params); code-importing "
                    "parameters such as loss_fn are refused over HTTP")
    eval_inputs: Optional[dict[str, Any]] = Field(
        None, examples=[{"texts": ["The river rose.", "She opened the door."]},
                        {"input_ids": [[101, 1996, 2314, 102], [101, 2016, 102]]}],
        description="model inputs for the analyses that run the model (causal, circuit): "
                    "texts (tokenized by the server's tokenizer) or token ids (ragged lists, "
                    "optionally attention_mask / token_type_ids); bounded sizes")


class LayerInfo(BaseModel):
    feature_shape: list[int]
    dtype: str
    shards: int
    rows: int
    steps: list[int] = Field(description="captured steps, the first 10,000 at most")
    steps_total: int = Field(description="how many steps were captured")


class ServedSAEInfo(BaseModel):
    d_in: int
    n_latents: int
    architecture: str
    format: Literal["saelens", "mechray"]
    hook_name: Optional[str] = None


class LayersResponse(BaseModel):
    store: str
    manifest_version: str = Field(description="changes whenever a shard is added or replaced")
    layers: dict[str, LayerInfo]
    saes: dict[str, ServedSAEInfo] = Field(
        default_factory=dict, description="SAEs the server was started with (mechray serve "
        "--sae NAME=DIR): an sae request names one as params.pretrained")


class ShardInfo(BaseModel):
    file: str
    step: int
    steps: list[int]
    rank: int
    rows: dict[str, int]
    bytes: int
    s3_uri: Optional[str] = None


class ShardsResponse(BaseModel):
    store: str
    manifest_version: str
    total: int = Field(description="shards in the store")
    offset: int = Field(description="index of this page's first shard")
    limit: int = Field(description="shards per page")
    next_offset: Optional[int] = Field(description="offset of the next page; null on the last")
    shards: list[ShardInfo]


class InterpretResponse(BaseModel):
    analysis_type: str
    layer_name: str
    params: dict[str, Any] = Field(description="the full validated parameters used")
    manifest_version: str
    result: dict[str, Any]
    seconds: float = Field(description="compute time (of the original run when cached)")
    cached: bool


class UploadInfo(BaseModel):
    sha256: str
    format: Literal["pt", "safetensors", "npy", "npz"]
    layers: dict[str, list[int]] = Field(description="uploaded layer -> [rows, features]")


class UploadResponse(BaseModel):
    analysis_type: str
    params: dict[str, Any]
    upload: UploadInfo
    results: dict[str, dict[str, Any]] = Field(description="per uploaded layer")
    seconds: float
    cached: bool


class JobAccepted(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    analysis_type: str
    layer_name: Optional[str] = None
    poll: str = Field(description="GET this path for the job's status and result")


class JobStatus(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    analysis_type: str
    layer_name: Optional[str] = None
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    result: Optional[Union[InterpretResponse, UploadResponse]] = None
    error: Optional["ErrorResponse"] = None


class HealthResponse(BaseModel):
    status: Literal["ok"]
    version: str
    store_ready: bool = Field(description="the store has a manifest (checked without parsing "
                                          "it: a damaged one answers 503 on the other routes)")
    ray: bool = Field(description="analyses fan out over Ray")
    model: bool = Field(False, description="the server has a model: causal, circuit and SAE "
                                           "splicing can run (mechray serve --model)")
    texts: bool = Field(False, description="the server has a tokenizer that encodes: "
                                           "eval_inputs.texts are accepted (--tokenizer)")
    jobs_pending: int


class ErrorResponse(BaseModel):
    error: str = Field(description="a short code, e.g. unknown_layer, bad_params, too_large")
    message: str = Field(description="what was wrong and how to fix it")
    valid: Optional[list[str]] = Field(None, description="the valid values, when one was wrong")
    errors: Optional[list[dict[str, Any]]] = Field(None, description="per-field problems")
    request_id: Optional[str] = Field(None, description="on a 5xx: the id the server logged "
                                                        "the details under")


JobStatus.model_rebuild()
