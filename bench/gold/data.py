"""Prompts (the first user turn of each bundled HH-RLHF dialogue) and gold-labelled pairs.

Split: prompts are ranked by sha256(seed, text); the first `heldout` are held out (evaluation and
the ARMs' held-out accuracy), the next `train` are the train side (pairs the ARMs and DPO learn
from). No prompt is on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rm_training.preference_data import BadRecord, adapt_hh, read_records, render_hh

BUILTIN_HH = "builtin:hh-rlhf"


def first_user_turns(max_records: int | None = None) -> list[str]:
    seen: dict[str, None] = {}
    for record in read_records(BUILTIN_HH, max_records=max_records):
        if isinstance(record, BadRecord):
            continue
        try:
            pair = adapt_hh(record)
        except BadRecord:
            continue
        text = pair.messages[0]["content"].strip()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The prompt as every engine here sees it: the chat template where the tokenizer has one
    (as rm_training renders it), else the HH form."""
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return list(tokenizer(render_hh(messages)).input_ids)


def split_prompts(tokenizer: Any, heldout: int, train: int, max_tokens: int, seed: int,
                  max_records: int | None = None) -> dict[str, list[dict[str, Any]]]:
    rows = []
    for text in first_user_turns(max_records):
        ids = prompt_ids(tokenizer, text)
        if len(ids) <= max_tokens:
            key = hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()
            rows.append({"key": key, "text": text, "ids": ids})
    rows.sort(key=lambda r: r["key"])
    if len(rows) < heldout + 1:
        raise ValueError(f"only {len(rows)} prompts fit {max_tokens} tokens; {heldout} are to be held out")
    return {"heldout": rows[:heldout], "train": rows[heldout:heldout + train]}


def gold_pairs(prompts: Sequence[dict[str, Any]], texts: Sequence[Sequence[str]], scores: np.ndarray,
               min_gap: float, per_prompt: int) -> list[dict[str, Any]]:
    """Pairs (i-th best, i-th worst) of each prompt's samples, kept when the gold gap is > min_gap.

    texts[p][s], scores[p, s]: sample s of prompt p. Records are TRL's conversational form."""
    pairs = []
    for p, prompt in enumerate(prompts):
        order = np.argsort(-scores[p], kind="stable")
        for i in range(min(per_prompt, len(order) // 2)):
            best, worst = int(order[i]), int(order[-1 - i])
            gap = float(scores[p, best] - scores[p, worst])
            if gap <= min_gap or texts[p][best].strip() == texts[p][worst].strip():
                continue
            pairs.append({
                "prompt": [{"role": "user", "content": prompt["text"]}],
                "chosen": [{"role": "assistant", "content": texts[p][best]}],
                "rejected": [{"role": "assistant", "content": texts[p][worst]}],
                "gold_gap": gap,
            })
    return pairs


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
