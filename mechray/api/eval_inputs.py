"""Eval inputs sent with a ``POST /interpret`` request, for the analyses that run the model.

Usage (JSON bodies)::

    {"analysis_type": "causal", "layer_name": "encoder.layer.3", "params": {"top_n": 16},
     "eval_inputs": {"texts": ["The river rose.", "She opened the door."]}}   # server tokenizer
    {"analysis_type": "circuit", "layer_name": "encoder.layer.3",
     "eval_inputs": {"input_ids": [[101, 1996, 2314, 102], [101, 2016, 102]]}}  # ragged is fine
    {"analysis_type": "circuit", "layer_name": "transformer.h.1",
     "params": {"metric": "logit_diff", "answer_tokens": [5510, 2198]},
     "eval_inputs": {"texts": ["When Mary and John went out, John gave it to"],
                     "corrupt_texts": ["When Mary and John went out, Mary gave it to"]}}

Token ids may be ragged (right-padded with ``pad_id`` and masked here) or come with their own
``attention_mask`` (and ``token_type_ids``) of the same shape; ``texts`` need the server's
tokenizer (``mechray serve --tokenizer``).  Sizes are bounded (:data:`MAX_SEQUENCES`,
:data:`MAX_TOKENS` per sequence, :data:`MAX_TOTAL_TOKENS`; the JSON body cap
``api_max_json_kb`` applies first) and token ids are checked against the model's vocabulary,
so a bad request is a 422 naming the problem, never a 500.  The inputs reach the analysis as
``eval_data`` (a dict of tensors: ``model(**inputs)``) and their digest is part of the cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Union

import torch
from torch import nn

from mechray.analysis.inputs import PromptPairs
from mechray.api.errors import ApiError

MAX_SEQUENCES = 1024
MAX_TOKENS = 512
MAX_TOTAL_TOKENS = 65_536
MAX_TEXT_CHARS = 4096
ID_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_INT64 = (-2 ** 63, 2 ** 63 - 1)
Inputs = Union[dict[str, torch.Tensor], PromptPairs]


def _bad(message: str) -> ApiError:
    return ApiError(422, "bad_eval_inputs", message + '. Send {"texts": ["..."]} (with a server '
                    'tokenizer) or {"input_ids": [[int, ...], ...]} (optionally with '
                    '"attention_mask" of the same shape)')


def parse_eval_inputs(value: Any, tokenizer: Any, model: Optional[nn.Module]
                      ) -> tuple[Inputs, str]:
    """``(keyword tensors, digest)`` for the request's ``eval_inputs`` (:class:`PromptPairs`
    of them with ``corrupt_texts``); 422 when they are bad."""
    if model is None:
        raise ApiError(422, "no_model", "eval_inputs need a model on the server; start it with "
                       "--model package.module:factory (mechray serve) or pass the model to "
                       "FastAPIIntegrationMixin(model, config)")
    if not isinstance(value, dict) or not value:
        raise _bad(f"eval_inputs must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - {"texts", "corrupt_texts", *ID_KEYS})
    if unknown:
        raise _bad(f"eval_inputs has unknown keys {unknown}; valid keys are "
                   f"{['texts', 'corrupt_texts', *ID_KEYS]}")
    if "corrupt_texts" in value:       # prompt pairs: tokenised together, one padded length
        if set(value) != {"texts", "corrupt_texts"}:
            raise _bad("eval_inputs.corrupt_texts go with texts (one corrupted text per clean "
                       "one) and nothing else")
        clean, corrupt = value["texts"], value["corrupt_texts"]
        if not isinstance(corrupt, list) or not isinstance(clean, list) or \
                len(corrupt) != len(clean):
            raise _bad("eval_inputs.corrupt_texts must be a list as long as texts")
        both = _tokenize(clean + corrupt, tokenizer)
        _check_vocab(both["input_ids"], model, tokenizer)
        digest = hashlib.sha256(json.dumps({k: v.tolist() for k, v in both.items()},
                                           sort_keys=True).encode()).hexdigest()
        n = len(clean)
        return PromptPairs({k: v[:n] for k, v in both.items()},
                           {k: v[n:] for k, v in both.items()}), digest
    if "texts" in value:
        if set(value) != {"texts"}:
            raise _bad("eval_inputs gives both texts and token ids; give one of them")
        inputs = _tokenize(value["texts"], tokenizer)
    else:
        inputs = _ids(value)
    _check_vocab(inputs["input_ids"], model, tokenizer)
    digest = hashlib.sha256(json.dumps({k: v.tolist() for k, v in inputs.items()},
                                       sort_keys=True).encode()).hexdigest()
    return inputs, digest


def _tokenize(texts: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise ApiError(422, "no_tokenizer", "eval_inputs.texts need a tokenizer on the server; "
                       "start it with mechray serve --tokenizer <name or path>, or send token "
                       "ids as eval_inputs.input_ids")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad("eval_inputs.texts must be a non-empty list of strings")
    if len(texts) > MAX_SEQUENCES:
        raise _bad(f"eval_inputs.texts has {len(texts)} texts; at most {MAX_SEQUENCES}")
    long = max(len(t) for t in texts)
    if long > MAX_TEXT_CHARS:
        raise _bad(f"a text of eval_inputs.texts has {long} characters; at most "
                   f"{MAX_TEXT_CHARS}")
    if not callable(tokenizer):
        raise ApiError(422, "no_tokenizer", "the server's tokenizer cannot encode texts (it "
                       "only decodes); send token ids as eval_inputs.input_ids")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS,
                    return_tensors="pt")
    out = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
    _check_total(out["input_ids"])
    return out


def _ids(value: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "input_ids" not in value:
        raise _bad("eval_inputs needs input_ids (or texts)")
    rows = _int_rows(value["input_ids"], "input_ids")
    width = max(len(r) for r in rows)
    given_mask = "attention_mask" in value
    out = {"input_ids": _padded(rows, width)}
    for key in ID_KEYS[1:]:
        if key in value:
            other = _int_rows(value[key], key)
            if [len(r) for r in other] != [len(r) for r in rows]:
                raise _bad(f"eval_inputs.{key} has rows of lengths "
                           f"{[len(r) for r in other][:8]} but input_ids "
                           f"{[len(r) for r in rows][:8]}; give one value per token")
            out[key] = _padded(other, width)
    if not given_mask:
        out["attention_mask"] = _padded([[1] * len(r) for r in rows], width)
    elif not bool(((out["attention_mask"] == 0) | (out["attention_mask"] == 1)).all()):
        raise _bad("eval_inputs.attention_mask holds values other than 0 and 1")
    _check_total(out["input_ids"])
    return out


def _int_rows(value: Any, key: str) -> list[list[int]]:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) and r
                                                           for r in value):
        raise _bad(f"eval_inputs.{key} must be a non-empty list of non-empty lists of ints "
                   "(one list per sequence)")
    if len(value) > MAX_SEQUENCES:
        raise _bad(f"eval_inputs.{key} has {len(value)} sequences; at most {MAX_SEQUENCES}")
    long = max(len(r) for r in value)
    if long > MAX_TOKENS:
        raise _bad(f"a sequence of eval_inputs.{key} has {long} tokens; at most {MAX_TOKENS}")
    if not all(type(x) is int for r in value for x in r):
        raise _bad(f"eval_inputs.{key} holds values that are not integers")
    wild = next((x for r in value for x in r if not _INT64[0] <= x <= _INT64[1]), None)
    if wild is not None:
        raise _bad(f"eval_inputs.{key} holds {str(wild)[:40]}, beyond a 64-bit integer; token "
                   "ids run from 0 to the vocabulary size - 1")
    return value


def _padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


def _check_total(ids: torch.Tensor) -> None:
    if ids.numel() > MAX_TOTAL_TOKENS:
        raise _bad(f"eval_inputs hold {ids.shape[0]} x {ids.shape[1]} = {ids.numel():,} padded "
                   f"tokens; at most {MAX_TOTAL_TOKENS:,} (send fewer or shorter sequences)")


def vocab_size(model: nn.Module, tokenizer: Any = None) -> Optional[int]:
    """The number of token ids the model embeds (its input embedding, else its first
    ``nn.Embedding``), or ``None`` when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def _check_vocab(ids: torch.Tensor, model: nn.Module, tokenizer: Any) -> None:
    if int(ids.min()) < 0:
        raise _bad(f"eval_inputs.input_ids holds the negative id {int(ids.min())}")
    n = vocab_size(model, tokenizer)
    if n is not None and int(ids.max()) >= n:
        raise _bad(f"eval_inputs.input_ids holds the id {int(ids.max())}, but the served "
                   f"model's vocabulary has {n} ids (0..{n - 1}); tokenize with the model's "
                   "own tokenizer")
