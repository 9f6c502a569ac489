"""A trajectory-level learned reward for ARGS: Bradley-Terry on the mean of per-token weights.

r(x, y) = mean_t u[y_t], u learned by L2-regularised logistic regression on the same gold pairs
the ARMs learn from (token ids of the base's tokenizer). ARGS needs a reward of *partial* responses
at every step for k candidates; this one updates in O(1) per candidate, where a sentence-embedding
reward model would embed k texts per step. (ARGS with the ARM itself as the reward is top-k-restricted
GenARM exactly: r(y_<t c) - r(y_<t) = log pi_r(c | y_<t), so it would compare the ARM with itself.)
Written here rather than taken from scikit-learn: a dense [pairs, vocabulary] design matrix
(49,152 columns) fits on the GPU, where this trains in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def mean_counts(sequences: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    out = torch.zeros((len(sequences), vocab), dtype=torch.float32)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids = torch.tensor(list(seq), dtype=torch.long)
            out[row].index_add_(0, ids, torch.full((len(seq),), 1.0 / len(seq)))
    return out


@dataclass
class BowReward:
    u: torch.Tensor  # [vocab] per-token reward
    l2: float
    train_accuracy: float
    heldout_accuracy: float | None


def _accuracy(u: torch.Tensor, diff: torch.Tensor) -> float:
    margin = diff @ u
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def fit_bow_reward(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], vocab: int,
                   heldout: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] | None = None,
                   l2: float = 1e-3, steps: int = 300, device: str | torch.device = "cpu") -> BowReward:
    diff = (mean_counts(chosen, vocab) - mean_counts(rejected, vocab)).to(device)
    u = torch.zeros(vocab, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(diff @ u)).mean() + l2 * (u * u).sum()
        loss.backward()
        optimizer.step()
    u = u.detach()
    held = None
    if heldout is not None and len(heldout[0]):
        held_diff = (mean_counts(heldout[0], vocab) - mean_counts(heldout[1], vocab)).to(device)
        held = _accuracy(u, held_diff)
    return BowReward(u=u, l2=l2, train_accuracy=_accuracy(u, diff), heldout_accuracy=held)
