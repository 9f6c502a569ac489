"""Decoding methods that are not a plain vLLM call, and the teacher-forced drift metric.

- `select_best_of_n`: best-of-N by the judge RM over a pool of N samples per prompt.
- `args_decode`: ARGS (Khanov et al. 2024, "ARGS: Alignment as Reward-Guided Search"), greedy
  variant: at every step the top-k tokens by base log-prob are each scored by
  base_logprob + w * r_judge(x, y_<t + candidate), and the best is kept. The judge RM scores
  every candidate's decoded partial response (B * k texts per step, batched).
- `base_logprobs`: log pi_base(y_t | x, y_<t) of any response, teacher-forced through the base in
  transformers (fp32); the prompt is encoded once and its KV cache shared by all responses.
- `vader_pairs`: preference pairs labelled by VADER over two base samples (the 'positive' ARM's data).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def select_best_of_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Index of the best of the first n samples per prompt; scores: [prompts, pool]."""
    if scores.shape[1] < n:
        raise ValueError(f"best-of-{n} needs {n} samples per prompt, the pool has {scores.shape[1]}")
    return np.argmax(scores[:, :n], axis=1)


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _decode(tokenizer: Any, ids: Sequence[int], eos: int | None) -> str:
    ids = list(ids)
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class ArgsResult:
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    wall_s: float
    lm_s: float = 0.0
    judge_s: float = 0.0
    judge_calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def args_decode(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    users: Sequence[str],
    reward_fn: Callable[[list[str], list[str]], np.ndarray],
    weight: float,
    top_k: int = 10,
    max_tokens: int = 64,
    batch_size: int = 16,
) -> ArgsResult:
    """ARGS-greedy on the base model; reward_fn(users, partial_responses) -> rewards."""
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    out_ids: list[list[int]] = []
    finish: list[str] = []
    lm_s = judge_s = 0.0
    calls = 0
    started = time.monotonic()
    for lo in range(0, len(prompt_ids), batch_size):
        batch = [list(p) for p in prompt_ids[lo:lo + batch_size]]
        batch_users = list(users[lo:lo + batch_size])
        rows = len(batch)
        width = max(len(p) for p in batch)
        ids = torch.zeros((rows, width), dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        generated: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        reasons = ["length"] * rows
        for _step in range(max_tokens):
            t0 = time.monotonic()
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True).logits[:, -1, :vocab].float()
            logp = torch.log_softmax(logits, dim=-1)
            cand_logp, cand = torch.topk(logp, top_k, dim=-1)
            lm_s += time.monotonic() - t0
            active = [b for b in range(rows) if not done[b]]
            t0 = time.monotonic()
            texts, owners = [], []
            for b in active:
                for c in cand[b].tolist():
                    texts.append(_decode(tokenizer, generated[b] + [c], eos))
                    owners.append(batch_users[b])
            rewards = np.asarray(reward_fn(owners, texts), dtype=np.float64).reshape(len(active), top_k)
            judge_s += time.monotonic() - t0
            calls += len(texts)
            scores = cand_logp[active].double().numpy() + weight * rewards
            chosen = torch.full((rows,), eos if eos is not None else 0, dtype=torch.long)
            for i, b in enumerate(active):
                token = int(cand[b, int(np.argmax(scores[i]))])
                chosen[b] = token
                generated[b].append(token)
                if token == eos:
                    done[b], reasons[b] = True, "stop"
            if all(done):
                break
            ids = chosen.view(-1, 1)
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            positions = positions[:, -1:] + 1
        out_ids.extend(generated)
        finish.extend(reasons)
    wall = time.monotonic() - started
    texts = [_decode(tokenizer, g, eos) for g in out_ids]
    return ArgsResult(out_ids, texts, finish, wall, lm_s, judge_s, calls)


@torch.inference_mode()
def base_logprobs(
    model: Any, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]], chunk: int = 32
) -> list[np.ndarray]:
    """log pi_base(y_t | x, y_<t) for each response to one prompt (prompt encoded once, its KV
    cache repeated over the responses; right padding is harmless under a causal mask)."""
    out: list[np.ndarray] = [np.zeros(0)] * len(responses)
    prompt = torch.tensor([list(prompt_ids)])
    first = model(input_ids=prompt, use_cache=True)
    first_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
    nonempty = [i for i, r in enumerate(responses) if len(r)]
    for lo in range(0, len(nonempty), chunk):
        group = nonempty[lo:lo + chunk]
        length = max(len(responses[i]) for i in group)
        ids = torch.zeros((len(group), length), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, :len(responses[i])] = torch.tensor(list(responses[i]))
        from copy import deepcopy

        cache = deepcopy(first.past_key_values)
        cache.batch_repeat_interleave(len(group))
        p = prompt.shape[1]
        mask = torch.ones((len(group), p + length), dtype=torch.long)
        positions = torch.arange(p, p + length).unsqueeze(0).expand(len(group), -1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits
        for row, i in enumerate(group):
            n = len(responses[i])
            target = ids[row, :n]
            first_tok = first_logp[target[0]].item()
            if n > 1:
                rest = torch.log_softmax(logits[row, : n - 1].float(), dim=-1).gather(-1, target[1:].unsqueeze(-1))
                values = np.concatenate([[first_tok], rest.squeeze(-1).numpy()])
            else:
                values = np.array([first_tok])
            out[i] = values.astype(np.float64)
    return out


def vader_pairs(prompts: Sequence[Any], samples: Sequence[Sequence[str]], sentiment: Callable, min_gap: float) -> tuple[list[dict], dict]:
    """Preference pairs from two samples per prompt: the one with higher VADER compound is chosen;
    pairs with |VADER(a) - VADER(b)| <= min_gap (ties, e.g. both 0) are skipped."""
    records, skipped_ties, skipped_same = [], 0, 0
    for pair, (a, b) in zip(prompts, samples, strict=True):
        if a.strip() == b.strip() or not a.strip() or not b.strip():
            skipped_same += 1
            continue
        sa, sb = sentiment([a, b])
        if abs(sa - sb) <= min_gap:
            skipped_ties += 1
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        records.append({"prompt": pair.raw_prompt, "chosen": chosen, "rejected": rejected,
                        "vader_chosen": float(max(sa, sb)), "vader_rejected": float(min(sa, sb))})
    report = {"prompts": len(prompts), "pairs": len(records), "skipped_ties": skipped_ties,
              "skipped_identical_or_empty": skipped_same, "min_gap": min_gap}
    return records, report
