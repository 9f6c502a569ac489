"""Teacher-forced log-probs of given responses in transformers (float32 by default): the base's
(for KL), each ARM's (sequence rewards for best-of-N), and the exact fused distribution's (to check
the engine's reported log-probs against)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server.fusion import fused_logprobs


@dataclass
class TeacherForced:
    base: list[np.ndarray]  # per sequence: log pi_base(y_t | x, y_<t) of each response token
    arms: list[list[np.ndarray]]  # [arm][sequence]: log pi_arm_k(y_t | ...)
    fused: list[np.ndarray] | None  # log of the fused distribution (weights given), else None
    tempered: list[np.ndarray] | None  # log softmax(z_base / T)(y_t) (temperatures given), else None


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.inference_mode()
def teacher_force(
    base: torch.nn.Module,
    arms: Sequence[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    vocab_size: int,
    weights: np.ndarray | None = None,  # [N, K]: fused log-probs with these weights
    temperatures: Sequence[float] | None = None,  # per sequence: the base at temperature T
    batch_size: int = 32,
) -> TeacherForced:
    device = next(base.parameters()).device
    n = len(prompts)
    out_base: list[np.ndarray] = [np.zeros(0)] * n
    out_arms = [[np.zeros(0)] * n for _ in arms]
    out_fused = [np.zeros(0)] * n if weights is not None else None
    out_temp = [np.zeros(0)] * n if temperatures is not None else None
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(responses[i]))
    for lo in range(0, n, batch_size):
        batch = [i for i in order[lo:lo + batch_size] if len(responses[i])]
        if not batch:
            continue
        width = max(len(prompts[i]) + len(responses[i]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = list(prompts[i]) + list(responses[i])
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in [base, *arms]]
        for row, i in enumerate(batch):
            start, length = len(prompts[i]) - 1, len(responses[i])
            target = ids[row, start + 1:start + 1 + length]
            per_model = [lg[row, start:start + length, :vocab_size].float() for lg in logits]
            logp = [torch.log_softmax(x, dim=-1) for x in per_model]
            pick = [lp.gather(1, target[:, None])[:, 0].cpu().numpy() for lp in logp]
            out_base[i] = pick[0]
            for k in range(len(arms)):
                out_arms[k][i] = pick[k + 1]
            if out_fused is not None:
                rows = torch.tensor(np.repeat(weights[i][None, :], length, axis=0), dtype=torch.float32, device=device)
                fused = fused_logprobs(per_model[0], per_model[1:], rows, vocab_size, validate=False)
                out_fused[i] = fused.gather(1, target[:, None])[:, 0].cpu().numpy()
            if out_temp is not None:
                tempered = torch.log_softmax(per_model[0] / float(temperatures[i]), dim=-1)
                out_temp[i] = tempered.gather(1, target[:, None])[:, 0].cpu().numpy()
    return TeacherForced(out_base, out_arms, out_fused, out_temp)
