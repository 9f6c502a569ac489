"""ARGS (Khanov et al. 2024), stochastic variant, with a learned trajectory reward.

At every step the base's top-k tokens c are scored s(c) = log pi_base(c) + w * r(x, y_<t c), and the
next token is sampled from softmax(s) over those k (T=1), so the policy's log-probability of every
token is known exactly and KL(pi || base) has the same per-token estimator as the other methods.
The reward is `bow_rm.BowReward` (mean of per-token weights), so r(x, y_<t c) costs O(1) per
candidate. One base forward per token (transformers, KV cache, left padding).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from bench.gold.bow_rm import BowReward


@dataclass
class ArgsOutput:
    token_ids: list[list[int]]
    logprobs: list[list[float]]  # log pi_ARGS of each chosen token
    wall_s: float
    generated_tokens: int


@torch.inference_mode()
def args_sample(model: torch.nn.Module, prompts: Sequence[Sequence[int]], reward: BowReward, weight: float,
                top_k: int, max_tokens: int, eos: int, vocab: int, seed: int, batch_size: int = 256) -> ArgsOutput:
    device = next(model.parameters()).device
    u = reward.u.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens: list[list[int]] = []
    logps: list[list[float]] = []
    started = time.monotonic()
    for lo in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[lo:lo + batch_size]]
        rows, width = len(batch), max(len(p) for p in batch)
        ids = torch.zeros((rows, width), dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        out_ids = [[] for _ in range(rows)]
        out_lp = [[] for _ in range(rows)]
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(max_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).logits[:, -1, :vocab].float()
            base_logp, cand = torch.topk(torch.log_softmax(logits, dim=-1), top_k, dim=-1)
            # r(y_<t c) = (sum_{s<t} u[y_s] + u[c]) / (t + 1); the first term is the same for every c.
            scores = base_logp + weight * u[cand] / (step + 1)
            policy = torch.log_softmax(scores, dim=-1)
            pick = torch.multinomial(policy.exp(), 1, generator=generator)
            chosen = cand.gather(1, pick)[:, 0]
            chosen_lp = policy.gather(1, pick)[:, 0]
            for b in torch.nonzero(~done)[:, 0].tolist():
                out_ids[b].append(int(chosen[b]))
                out_lp[b].append(float(chosen_lp[b]))
            done |= chosen == eos
            if bool(done.all()):
                break
            ids = chosen[:, None]
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            positions = positions[:, -1:] + 1
        tokens += out_ids
        logps += out_lp
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.monotonic() - started
    return ArgsOutput(tokens, logps, wall, sum(len(t) for t in tokens))
