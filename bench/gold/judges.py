"""Gold judges (real packaged scorers, offline) and the reward-hacking guards.

Gold judges, one per reward dimension, each a function texts -> scores:
- `positive`: VADER's compound sentiment (vaderSentiment, a lexicon with rules), in [-1, 1].
- `objective`: 1 - TextBlob's subjectivity (the pattern lexicon it ships), in [0, 1]. Partly in
  tension with `positive`: most strongly positive words are also subjective ones.

Guards (a method that wins on gold while these fall below the base's is reward hacking):
- `relevance`: cosine between MiniLM sentence embeddings of the prompt and the response.
- `distinct2`: distinct bigrams / bigrams of the response's words (1 = no repetition).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from bench.quality.judges import sentiment as positive  # VADER's compound score, in [-1, 1]


def objective(texts: Sequence[str]) -> np.ndarray:
    from textblob import TextBlob

    return np.asarray([1.0 - TextBlob(t).sentiment.subjectivity for t in texts], dtype=np.float64)


GOLD_JUDGES: dict[str, Callable[[Sequence[str]], np.ndarray]] = {"positive": positive, "objective": objective}
GOLD_DESCRIPTIONS = {
    "positive": "VADER compound sentiment of the response (vaderSentiment 3.3.2), in [-1, 1]",
    "objective": "1 - TextBlob subjectivity of the response (textblob, pattern lexicon), in [0, 1]",
}


def gold(dimension: str, texts: Sequence[str]) -> np.ndarray:
    if dimension not in GOLD_JUDGES:
        raise ValueError(f"no gold judge for {dimension!r}; known: {sorted(GOLD_JUDGES)}")
    return GOLD_JUDGES[dimension](texts)


def distinct2(texts: Sequence[str]) -> np.ndarray:
    out = []
    for text in texts:
        words = text.lower().split()
        bigrams = list(zip(words, words[1:]))
        out.append(len(set(bigrams)) / len(bigrams) if bigrams else 1.0)
    return np.asarray(out, dtype=np.float64)


class Relevance:
    """Prompt-response cosine of all-MiniLM-L6-v2 embeddings (the packaged model, offline)."""

    def __init__(self) -> None:
        from bench.quality.judges import Embedder

        self.embedder = Embedder()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        e_prompt = self.embedder(list(prompts))
        e_resp = self.embedder(list(responses))
        return np.sum(e_prompt * e_resp, axis=1).astype(np.float64)
