"""Prompts and preference pairs for the quality experiment, split exactly as the ARM's training split.

The split is `rm_training.preference_data.prepare_data` run again with the settings the ARM was
trained with (read from its `genarm_arm.json`, or `checkpoints/genarm_run.json` of its run): a pair
is held out when sha256(split_seed, prompt) < heldout_fraction, so the held-out prompts here are
exactly the ARM's held-out prompts, and the judge RM is trained on exactly the ARM's training pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rm_training.preference_data import adapt, pku_label_for, prepare_data, read_records, resolve_source


@dataclass
class SplitSettings:
    """What decides the split (and the prompt rendering): the ARM's own data settings."""

    source: str = "builtin:hh-rlhf"
    max_length: int = 384
    max_prompt_length: int = 256
    heldout_fraction: float = 0.1
    split_seed: int = 0
    use_chat_template: bool = True
    system_prompt: str | None = None
    dimension: str = "harmless"
    recorded_in: str | None = None  # the file these settings were read from

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def split_settings_of_arm(arm_dir: str | Path) -> SplitSettings:
    """The data settings an ARM was trained with: its genarm_arm.json, else its run's genarm_run.json."""
    arm_dir = Path(arm_dir)
    info_file = arm_dir / "genarm_arm.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        data = info["data"]
        split = data["split"]
        return SplitSettings(
            source=data["source"], max_length=int(data["max_length"]),
            max_prompt_length=int(data["max_prompt_length"]),
            heldout_fraction=float(split.get("heldout_fraction", 0.1)),
            split_seed=int(split.get("split_seed", 0)),
            use_chat_template=data.get("rendering", "chat_template") == "chat_template",
            dimension=info.get("dimension", "harmless"), recorded_in=str(info_file),
        )
    for run_file in (arm_dir.parent / "checkpoints" / "genarm_run.json", arm_dir / "checkpoints" / "genarm_run.json"):
        if run_file.is_file():
            cfg = json.loads(run_file.read_text())["config"]
            return SplitSettings(
                source=cfg["data"], max_length=int(cfg["max_length"]), max_prompt_length=int(cfg["max_prompt_length"]),
                heldout_fraction=float(cfg["heldout_fraction"]), split_seed=int(cfg["split_seed"]),
                use_chat_template=bool(cfg["use_chat_template"]), system_prompt=cfg.get("system_prompt"),
                dimension=cfg.get("dimension", "harmless"), recorded_in=str(run_file),
            )
    raise FileNotFoundError(f"{arm_dir}: no genarm_arm.json (nor a run's genarm_run.json) to read the split from")


@dataclass
class TextPair:
    """One preference pair as text, with its prompt rendered for the base (token ids)."""

    index: int  # record number in the source file
    key: str  # the prompt as JSON (what the split hashes)
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    prompt_ids: list[int]  # chat-template rendering, oldest turns dropped to fit max_prompt_length
    raw_prompt: str | None = None  # HH plain-text form ("\n\nHuman: ...\n\nAssistant:")

    @property
    def last_user(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class SplitData:
    train: list[TextPair]
    heldout: list[TextPair]
    settings: SplitSettings
    report: dict[str, Any] = field(default_factory=dict)

    def prompts(self, side: str, n: int | None) -> list[TextPair]:
        """The first n distinct prompts of one side, in file order (one pair per prompt)."""
        seen: set[str] = set()
        out: list[TextPair] = []
        for pair in self.train if side == "train" else self.heldout:
            if pair.key in seen:
                continue
            seen.add(pair.key)
            out.append(pair)
            if n is not None and len(out) >= n:
                break
        return out


def load_split(tokenizer: Any, settings: SplitSettings, max_records: int | None = None) -> SplitData:
    """The ARM's train / held-out split of the preference data, as text pairs."""
    prepared = prepare_data(
        settings.source, tokenizer, max_length=settings.max_length, max_prompt_length=settings.max_prompt_length,
        dimension=settings.dimension, heldout_fraction=settings.heldout_fraction, split_seed=settings.split_seed,
        use_chat_template=settings.use_chat_template, system_prompt=settings.system_prompt, max_records=max_records,
    )
    wanted = {p.index: p for p in prepared.train + prepared.heldout}
    texts: dict[int, TextPair] = {}
    label = pku_label_for(settings.dimension, None)
    for index, record in enumerate(read_records(resolve_source(settings.source), max_records=max_records)):
        if index not in wanted:
            continue
        _, pair = adapt(record, "auto", label)
        enc = wanted[index]
        texts[index] = TextPair(index, enc.key, pair.messages, pair.chosen, pair.rejected, list(enc.prompt_ids),
                                pair.raw_prompt)
    return SplitData(
        train=[texts[p.index] for p in prepared.train],
        heldout=[texts[p.index] for p in prepared.heldout],
        settings=settings,
        report=prepared.report,
    )
