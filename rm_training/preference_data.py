"""Preference data -> (prompt, chosen, rejected) -> token ids; bad records are counted, never fatal.

Adapters (picked per record by `data_format: auto`, or forced):
- `pairs`: {"prompt": str, "chosen": str, "rejected": str} (a prompt in HH form, "\\n\\nHuman: ...
  \\n\\nAssistant:", as in Dahoas/full-hh-rlhf, is split into turns).
- `hh`: Anthropic HH-RLHF, {"chosen": dialogue, "rejected": dialogue}: two full dialogues sharing every
  turn but the last; split at the last "\\n\\nAssistant:".
- `pku`: PKU-SafeRLHF, {"prompt", "response_0", "response_1", "better_response_id",
  "safer_response_id"}: one record gives two dimensions, better -> helpful, safer -> harmless.
- `messages`: UltraFeedback-binarized (chosen / rejected message lists sharing the prompt turns) and
  TRL's conversational form (prompt list + one-message chosen / rejected lists).

Rendering: with a chat template (and `use_chat_template`), the prompt turns are chat messages and the
response is the assistant message, tokenized exactly as TRL's DPOTrainer does (prompt with the
generation prompt; completion = where prompt and prompt+response token lists diverge). Without one,
the prompt is plain text in HH form and the response is followed by EOS.

Truncation rules (the official recipe's max prompt 512 / max length 1024): a prompt longer than
`max_prompt_length` tokens loses its oldest turns until it fits (a prompt whose last user turn alone
is too long is skipped: "prompt_too_long"); responses are cut so prompt + response fits `max_length`
(counted as truncated; a pair whose two cut responses are equal is skipped).

Split: a pair is held out when sha256(seed, prompt) falls under `heldout_fraction`, so one prompt
(with all its pairs) never lands on both sides, and the split is the same on every run and rank.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

SKIP_REASONS = {
    "unparseable": "the line / row could not be read as a record",
    "missing_field": "a needed field is missing or has the wrong type",
    "unknown_format": "no adapter recognises the record",
    "prompt_mismatch": "HH dialogues whose turns before the last reply differ",
    "unparseable_dialogue": "an HH dialogue that does not split into Human / Assistant turns",
    "not_single_response": "message lists that differ by more than one final assistant message",
    "bad_label": "a PKU response id that is not 0 or 1",
    "tied_scores": "chosen and rejected carry the same score",
    "empty_prompt": "no prompt text",
    "empty_response": "an empty chosen or rejected response",
    "identical_responses": "chosen == rejected",
    "prompt_too_long": "the last user turn alone exceeds max_prompt_length tokens",
    "identical_after_truncation": "chosen and rejected are equal once cut to max_length",
}
EXAMPLES_PER_REASON = 5
HH_MARKER = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
PKU_LABELS = {"helpful": "better", "harmless": "safer"}
READABLE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# Data shipped with the package: `--data builtin:hh-rlhf` (2,000 real HH-RLHF harmless pairs, MIT).
BUILTIN = {"hh-rlhf": Path(__file__).resolve().parent / "data" / "hh-rlhf" / "harmless-pairs-2000.jsonl.gz"}


class DataError(ValueError):
    """The data source cannot be used at all (not one bad record: those are counted)."""


class BadRecord(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Pair:
    messages: list[dict[str, str]]  # the prompt as chat turns (roles user / assistant / system)
    chosen: str
    rejected: str
    raw_prompt: str | None = None  # the prompt as given, for tokenizers without a chat template
    index: int = -1  # record number in the source


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    key: str  # what the split hashes: the prompt
    truncated: bool = False
    shortened: bool = False  # older turns dropped to fit max_prompt_length


@dataclass
class DataReport:
    source: str
    records: int = 0
    kept: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[int]] = field(default_factory=dict)
    responses_truncated: int = 0
    prompts_shortened: int = 0

    def skip(self, reason: str, index: int) -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "records": self.records,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "skipped_examples": {k: v for k, v in sorted(self.skipped_examples.items())},
            "formats": dict(self.formats),
            "responses_truncated": self.responses_truncated,
            "prompts_shortened": self.prompts_shortened,
        }


# ----------------------------------------------------------------------------- reading


def resolve_source(source: str) -> str:
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DataError(f"unknown built-in data {name!r}; built in: {', '.join(sorted(BUILTIN))}")
        return str(BUILTIN[name])
    return source


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or source.endswith(READABLE_SUFFIXES)


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(READABLE_SUFFIXES))
        if not files:
            raise DataError(f"{path} holds no {', '.join(READABLE_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return [path]


def _read_json_file(path: Path) -> Iterator[dict | BadRecord]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head == "[":  # one JSON array
            try:
                items = json.loads(head + f.read())
            except json.JSONDecodeError as err:
                raise DataError(f"{path} is not valid JSON: {err}") from None
            for item in items:
                yield item if isinstance(item, dict) else BadRecord("unparseable")
            return
        first = True
        for line in f:
            if first:
                line, first = head + line, False
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                yield BadRecord("unparseable")
                continue
            yield item if isinstance(item, dict) else BadRecord("unparseable")


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def read_records(
    source: str, split: str | None = None, data_dir: str | None = None, max_records: int | None = None
) -> Iterator[dict | BadRecord]:
    """Records of a local file / folder, or of a `datasets` hub name (needs the network)."""
    count = 0
    source = resolve_source(source)
    if _is_local(source):
        streams = []
        for path in _local_files(Path(source).expanduser()):
            streams.append(_read_parquet(path) if path.name.endswith(".parquet") else _read_json_file(path))
    else:
        streams = [_read_hub(source, split, data_dir)]
    for stream in streams:
        for record in stream:
            if max_records is not None and count >= max_records:
                return
            count += 1
            yield record


def _read_hub(name: str, split: str | None, data_dir: str | None) -> Iterator[dict]:
    import datasets

    if split is None:
        split = "train_prefs" if "ultrafeedback" in name.lower() else "train"
    try:
        dataset = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as err:  # noqa: BLE001 - any failure here is one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not load dataset {name!r} (split {split!r}): {first}") from None
    yield from dataset


# ----------------------------------------------------------------------------- adapters


def detect_format(record: dict) -> str:
    if "response_0" in record and ("better_response_id" in record or "safer_response_id" in record):
        return "pku"
    if isinstance(record.get("chosen"), list) or isinstance(record.get("prompt"), list):
        return "messages"
    if "prompt" in record:
        return "pairs"
    if isinstance(record.get("chosen"), str) and HH_MARKER in record["chosen"]:
        return "hh"
    return "unknown"


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> chat messages."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise BadRecord("unparseable_dialogue")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def render_hh(messages: list[dict[str, str]]) -> str:
    """Chat messages -> the HH plain-text prompt ending in '\\n\\nAssistant:' (system text goes first)."""
    text = ""
    for message in messages:
        if message["role"] == "system":
            text += message["content"]
        else:
            speaker = "Human" if message["role"] == "user" else "Assistant"
            text += f"\n\n{speaker}: {message['content']}"
    return text + HH_MARKER


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise BadRecord("missing_field")
    return value


def adapt_hh(record: dict) -> Pair:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    i, j = chosen.rfind(HH_MARKER), rejected.rfind(HH_MARKER)
    if i < 0 or j < 0:
        raise BadRecord("unparseable_dialogue")
    if chosen[:i] != rejected[:j]:
        raise BadRecord("prompt_mismatch")
    messages = parse_hh_dialogue(chosen[:i])
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("unparseable_dialogue")
    return Pair(messages, chosen[i + len(HH_MARKER):].strip(), rejected[j + len(HH_MARKER):].strip(),
                raw_prompt=chosen[:i] + HH_MARKER)


def adapt_pairs(record: dict) -> Pair:
    prompt, chosen, rejected = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
    if prompt.lstrip(" ").startswith("\n\nHuman:"):  # HH form, e.g. Dahoas/full-hh-rlhf
        body = prompt.rstrip()
        if body.endswith(HH_MARKER):
            body = body[: -len(HH_MARKER)]
        messages = parse_hh_dialogue(body.lstrip(" "))
        if not messages or messages[-1]["role"] != "user":
            raise BadRecord("unparseable_dialogue")
        raw = body + HH_MARKER
    else:
        messages = [{"role": "user", "content": prompt}]
        raw = prompt
    return Pair(messages, chosen.strip(), rejected.strip(), raw_prompt=raw)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise BadRecord("missing_field")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def adapt_messages(record: dict) -> Pair:
    chosen, rejected = _messages(record.get("chosen")), _messages(record.get("rejected"))
    if isinstance(record.get("prompt"), list):
        prompt = _messages(record["prompt"])
        chosen, rejected = prompt + chosen, prompt + rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    tail_c, tail_r = chosen[shared:], rejected[shared:]
    if len(tail_c) != 1 or len(tail_r) != 1 or tail_c[0]["role"] != "assistant" or tail_r[0]["role"] != "assistant":
        raise BadRecord("not_single_response")
    if shared == 0:
        raise BadRecord("empty_prompt")
    sc, sr = record.get("score_chosen"), record.get("score_rejected")
    if isinstance(sc, (int, float)) and isinstance(sr, (int, float)) and sc == sr:
        raise BadRecord("tied_scores")
    return Pair(chosen[:shared], tail_c[0]["content"].strip(), tail_r[0]["content"].strip())


def adapt_pku(record: dict, label: str) -> Pair:
    prompt = _text(record, "prompt")
    responses = [_text(record, "response_0"), _text(record, "response_1")]
    winner = record.get(f"{label}_response_id")
    if isinstance(winner, bool) or winner not in (0, 1):
        raise BadRecord("bad_label" if f"{label}_response_id" in record else "missing_field")
    return Pair([{"role": "user", "content": prompt}], responses[winner].strip(), responses[1 - winner].strip())


def adapt(record: dict | BadRecord, data_format: str, pku_label: str) -> tuple[str, Pair]:
    if isinstance(record, BadRecord):
        raise record
    fmt = detect_format(record) if data_format == "auto" else data_format
    if fmt == "hh":
        pair = adapt_hh(record)
    elif fmt == "pairs":
        pair = adapt_pairs(record)
    elif fmt == "messages":
        pair = adapt_messages(record)
    elif fmt == "pku":
        pair = adapt_pku(record, pku_label)
    else:
        raise BadRecord("unknown_format")
    if not any(m["content"].strip() for m in pair.messages if m["role"] == "user") and not (pair.raw_prompt or "").strip():
        raise BadRecord("empty_prompt")
    if not pair.chosen or not pair.rejected:
        raise BadRecord("empty_response")
    if pair.chosen == pair.rejected:
        raise BadRecord("identical_responses")
    return fmt, pair


# ----------------------------------------------------------------------------- tokenization


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PairEncoder:
    """Pairs -> token ids with TRL DPOTrainer's tokenization and the truncation rules above."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        max_prompt_length: int,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt

    @property
    def rendering(self) -> str:
        return "chat_template" if self.chat else "plain_text"

    def _ids(self, value: Any, **kwargs: Any) -> list[int]:
        if isinstance(value, list):
            out = self.tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **kwargs)
        else:
            out = self.tokenizer(text=value)
        return list(out["input_ids"])

    def _prompts(self, pair: Pair) -> Iterator[tuple[Any, bool]]:
        """The prompt, then shorter versions without the oldest turns: (prompt, shortened)."""
        turns = list(pair.messages)
        system = [m for m in turns[:1] if m["role"] == "system"]
        turns = turns[len(system):]
        if self.system_prompt and not system:
            system = [{"role": "system", "content": self.system_prompt}]
        starts = [i for i, m in enumerate(turns) if m["role"] == "user"] or [0]
        for n, start in enumerate(starts):
            kept = system + turns[start:]
            if self.chat:
                yield kept, n > 0
            elif n == 0 and pair.raw_prompt is not None:
                yield pair.raw_prompt, False
            else:
                yield render_hh(kept), n > 0

    def _full(self, prompt: Any, response: str) -> Any:
        if isinstance(prompt, list):
            return prompt + [{"role": "assistant", "content": response}]
        eos = self.tokenizer.eos_token or ""
        sep = " " if prompt.endswith(":") and not response[:1].isspace() else ""
        text = prompt + sep + response
        return text if text.endswith(eos) else text + eos

    def encode(self, pair: Pair) -> EncodedPair:
        for prompt, shortened in self._prompts(pair):
            prompt_ids = self._ids(prompt, add_generation_prompt=True) if self.chat else self._ids(prompt)
            if len(prompt_ids) <= self.max_prompt_length:
                break
        else:
            raise BadRecord("prompt_too_long")
        full_chosen = self._ids(self._full(prompt, pair.chosen))
        full_rejected = self._ids(self._full(prompt, pair.rejected))
        # As TRL: the completion starts where prompt and prompt+completion diverge.
        prompt_len = min(_common_prefix(prompt_ids, full_chosen), _common_prefix(prompt_ids, full_rejected))
        chosen_ids, rejected_ids = full_chosen[prompt_len:], full_rejected[prompt_len:]
        if not chosen_ids or not rejected_ids:
            raise BadRecord("empty_response")
        room = self.max_length - prompt_len
        truncated = len(chosen_ids) > room or len(rejected_ids) > room
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            raise BadRecord("identical_after_truncation" if truncated else "identical_responses")
        key = json.dumps(pair.messages, ensure_ascii=False, sort_keys=True)
        return EncodedPair(prompt_ids[:prompt_len], chosen_ids, rejected_ids, pair.index, key, truncated, shortened)


# ----------------------------------------------------------------------------- split + assembly


def heldout_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from the prompt and the seed."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def encode_source(
    source: str,
    encoder: PairEncoder,
    data_format: str = "auto",
    pku_label: str = "safer",
    split: str | None = None,
    data_dir: str | None = None,
    max_records: int | None = None,
) -> tuple[list[EncodedPair], DataReport]:
    report = DataReport(source=source)
    encoded: list[EncodedPair] = []
    for index, record in enumerate(read_records(source, split, data_dir, max_records)):
        report.records += 1
        try:
            fmt, pair = adapt(record, data_format, pku_label)
            pair.index = index
            item = encoder.encode(pair)
        except BadRecord as bad:
            report.skip(bad.reason, index)
            continue
        report.formats[fmt] += 1
        report.kept += 1
        report.responses_truncated += item.truncated
        report.prompts_shortened += item.shortened
        encoded.append(item)
    return encoded, report


def to_dataset(pairs: list[EncodedPair]):
    import datasets

    return datasets.Dataset.from_dict({
        "prompt_ids": [p.prompt_ids for p in pairs],
        "chosen_ids": [p.chosen_ids for p in pairs],
        "rejected_ids": [p.rejected_ids for p in pairs],
    })


@dataclass
class PreparedData:
    train: list[EncodedPair]
    heldout: list[EncodedPair]
    report: dict[str, Any]

    def train_dataset(self):
        return to_dataset(self.train)

    def heldout_dataset(self):
        return to_dataset(self.heldout) if self.heldout else None


def pku_label_for(dimension: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    return PKU_LABELS.get(dimension, "safer" if "harm" in dimension or "saf" in dimension else "better")


def prepare_data(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
    dimension: str = "harmless",
    data_format: str = "auto",
    pku_label: str | None = None,
    split: str | None = None,
    data_dir: str | None = None,
    max_records: int | None = None,
    heldout_fraction: float = 0.1,
    heldout_data: str | None = None,
    split_seed: int = 0,
    use_chat_template: bool = True,
    system_prompt: str | None = None,
) -> PreparedData:
    """Read, adapt, tokenize and split; raises DataError only when nothing usable is left."""
    encoder = PairEncoder(tokenizer, max_length, max_prompt_length, use_chat_template, system_prompt)
    label = pku_label_for(dimension, pku_label)
    pairs, report = encode_source(source, encoder, data_format, label, split, data_dir, max_records)
    if not pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.skipped.most_common()) or "no records"
        raise DataError(f"no usable preference pairs in {source} ({report.records} records; {reasons})")
    heldout_report = None
    if heldout_data:
        train, heldout = pairs, []
        heldout, h_report = encode_source(heldout_data, encoder, data_format, label, split, data_dir, None)
        heldout_report = h_report.to_dict()
        split_info = {"method": "separate file", "heldout_data": heldout_data}
    else:
        train, heldout = [], []
        for item in pairs:
            (heldout if heldout_score(item.key, split_seed) < heldout_fraction else train).append(item)
        split_info = {
            "method": "sha256(split_seed, prompt) < heldout_fraction: a prompt is on one side only",
            "heldout_fraction": heldout_fraction,
            "split_seed": split_seed,
        }
    if not train:
        raise DataError(f"no training pairs left after the split of {source} (heldout_fraction={heldout_fraction})")
    split_info.update({"train_pairs": len(train), "heldout_pairs": len(heldout)})
    out = report.to_dict()
    out.update({"rendering": encoder.rendering, "pku_label": label if report.formats.get("pku") else None,
                "max_length": max_length, "max_prompt_length": max_prompt_length, "split": split_info})
    if heldout_report is not None:
        out["heldout_report"] = heldout_report
    return PreparedData(train, heldout, out)
