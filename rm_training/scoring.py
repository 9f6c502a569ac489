"""ARM rewards computed directly from a model's logits: r(x, y) = sum_t log pi(y_t | x, y_<t).

Independent of TRL (plain forward + log_softmax), so it checks the trainer: the held-out accuracy
and margin reported at the end of a run, the hand-computed loss in the tests, and the
benchmarks all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pad_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and completion mask of prompt + completion."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        ids[row, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention[row, :n] = 1
        completion[row, len(p):n] = 1
    return ids, attention, completion


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """Summed (or, with average=True, length-averaged) log-probs of the completion tokens, per row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target = input_ids[:, 1:]
    mask = completion_mask[:, 1:].bool()
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    rows = mask.nonzero(as_tuple=True)[0]
    # Only completion positions go through log_softmax: no [B, L, V] float copy of the logits.
    picked = logits[:, :-1][mask].float()
    token_logps = torch.log_softmax(picked, dim=-1).gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
    out = out.index_add(0, rows, token_logps)
    if average:
        out = out / mask.sum(dim=1).clamp(min=1)
    return out


def arm_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta_r: float) -> torch.Tensor:
    """GenARM's loss: -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l))), averaged over the batch."""
    return -F.logsigmoid(beta_r * (chosen_logps - rejected_logps)).mean()


@dataclass
class PairScores:
    chosen: list[float]
    rejected: list[float]

    @property
    def n(self) -> int:
        return len(self.chosen)

    @property
    def accuracy(self) -> float:
        return sum(c > r for c, r in zip(self.chosen, self.rejected, strict=True)) / max(1, self.n)

    @property
    def margin(self) -> float:
        return sum(c - r for c, r in zip(self.chosen, self.rejected, strict=True)) / max(1, self.n)

    def loss(self, beta_r: float) -> float:
        return float(arm_loss(torch.tensor(self.chosen), torch.tensor(self.rejected), beta_r))


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence, pad_id: int, batch_size: int = 8) -> PairScores:
    """ARM rewards of chosen and rejected for each pair (objects with prompt/chosen/rejected_ids)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            prompts = [p.prompt_ids for p in batch] * 2
            completions = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
            ids, attention, completion = (t.to(device) for t in pad_sequences(prompts, completions, pad_id))
            logps = sequence_logps(model, ids, attention, completion).cpu().tolist()
            chosen.extend(logps[: len(batch)])
            rejected.extend(logps[len(batch):])
    finally:
        model.train(was_training)
    return PairScores(chosen, rejected)
