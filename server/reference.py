"""Plain PyTorch + transformers guided generation: the oracle for every fast path.

One Hugging Face model per role (base + K ARMs), each with its own KV cache; a batch of
prompts left-padded together; every step fuses the models' next-token logits with
`fusion.fused_logprobs` and samples with `fusion.sample_next_tokens`. This is also the
"how the research code does it" baseline in the benchmarks, so it stays obviously right
rather than clever: no custom kernels, no batching tricks beyond left padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from genarm_common.model_checks import FusionSetup, check_fusion_setup, load_tokenizer
from server.fusion import fused_logprobs, sample_next_tokens
from server.guidance import unbounded_spec


@dataclass
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # fused log-prob of each chosen token
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


class ReferenceGuidedGenerator:
    """Loads a base and its ARMs (HF folders) and generates guided text, batch by batch."""

    def __init__(
        self,
        base_path: str | Path,
        arm_paths: Mapping[str, str | Path],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.setup: FusionSetup = check_fusion_setup(base_path, dict(arm_paths))
        self.dimensions = list(self.setup.arms)
        self.spec = unbounded_spec(self.dimensions)
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(self.setup.base.path)
        self.vocab_size = self.setup.vocab_size
        self.base = self._load(self.setup.base.path, dtype)
        self.arms = [self._load(f.path, dtype) for f in self.setup.arms.values()]

    def _load(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(self.device).eval()

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.base, *self.arms]

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)

    def weight_tensor(self, weights: Sequence[Mapping[str, float]]) -> torch.Tensor:
        return torch.tensor([self.spec.row(w) for w in weights], dtype=torch.float32)

    @torch.inference_mode()
    def next_token_logits(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every model's next-token logits after each full sequence, recomputed from scratch."""
        input_ids, mask, positions = self._left_pad(sequences)
        outs = [m(input_ids=input_ids, attention_mask=mask, position_ids=positions) for m in self.models]
        logits = [o.logits[:, -1, :].float() for o in outs]
        return logits[0], logits[1:]

    @torch.inference_mode()
    def fused_step(
        self, sequences: Sequence[Sequence[int]], weights: Sequence[Mapping[str, float]]
    ) -> torch.Tensor:
        """Fused log-probs [B, vocab] of the next token after each sequence (teacher forcing)."""
        base, arms = self.next_token_logits(sequences)
        return fused_logprobs(base, arms, self.weight_tensor(weights), self.vocab_size)

    @torch.inference_mode()
    def teacher_forced(
        self, prompt_ids: Sequence[int], generated_ids: Sequence[int], weights: Mapping[str, float]
    ) -> torch.Tensor:
        """Fused log-probs [len(generated), vocab] at each generated position, in one forward per
        model over prompt + generated: checks another decoder's tokens step by step."""
        ids = torch.tensor([list(prompt_ids) + list(generated_ids)], device=self.device)
        first = len(prompt_ids) - 1
        last = first + len(generated_ids)
        logits = [m(input_ids=ids).logits[0, first:last].float() for m in self.models]
        rows = self.weight_tensor([weights] * len(generated_ids)).to(self.device)
        return fused_logprobs(logits[0], logits[1:], rows, self.vocab_size)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        weights: Sequence[Mapping[str, float]],
        options: SamplingOptions | Sequence[SamplingOptions] = SamplingOptions(),
        use_kv_cache: bool = True,
    ) -> list[Generation]:
        """Guided generation for a batch; weights[b] maps reward dimension -> weight for prompt b.

        use_kv_cache=False recomputes every prefix at every step (the naive loop the cached
        path is tested against).
        """
        if len(weights) != len(prompts):
            raise ValueError("one weight mapping per prompt is needed")
        opts = list(options) if isinstance(options, Sequence) else [options] * len(prompts)
        weight_rows = self.weight_tensor(weights).to(self.device)
        prompt_ids = [self.encode(p) for p in prompts]
        results = [Generation() for _ in prompts]
        generators = [self._generator(o.seed) for o in opts]
        temperature = torch.tensor([o.temperature for o in opts])
        top_p = torch.tensor([o.top_p for o in opts])
        top_k = torch.tensor([o.top_k for o in opts])
        eos = self.tokenizer.eos_token_id

        input_ids, mask, positions = self._left_pad(prompt_ids)
        caches = [DynamicCache() for _ in self.models]
        sequences = [list(p) for p in prompt_ids]
        max_steps = max(o.max_tokens for o in opts)
        for _ in range(max_steps):
            if use_kv_cache:
                logits = self._forward_cached(input_ids, mask, positions, caches)
            else:
                base_logits, arm_logits = self.next_token_logits(sequences)
                logits = [base_logits, *arm_logits]
            fused = fused_logprobs(
                logits[0], logits[1:], weight_rows, self.vocab_size, validate=False
            )
            chosen = sample_next_tokens(fused.cpu(), temperature, top_p, top_k, generators)
            for b, token in enumerate(chosen.tolist()):
                result = results[b]
                sequences[b].append(token)
                if result.finish_reason is not None:
                    continue
                result.token_ids.append(token)
                result.logprobs.append(float(fused[b, token]))
                self._update_finish(result, token, opts[b], eos)
            if all(r.finish_reason is not None for r in results):
                break
            # Next step feeds only the new token; finished rows keep decoding (ignored).
            input_ids = chosen.view(-1, 1).to(self.device)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
        for result in results:
            if result.finish_reason is None:
                result.finish_reason = "length"
            if not result.text:
                result.text = self._decode(result.token_ids, eos)
        return results

    def _forward_cached(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        caches: list[DynamicCache],
    ) -> list[torch.Tensor]:
        logits = []
        for model, cache in zip(self.models, caches, strict=True):
            out = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(out.logits[:, -1, :].float())
        return logits

    def _left_pad(
        self, sequences: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, attention mask and position ids (counting real tokens only)."""
        width = max(len(s) for s in sequences)
        # Pad with id 0, masked out anyway: the tokenizer's pad id may lie past an ARM's table.
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, seq in enumerate(sequences):
            ids[b, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[b, width - len(seq) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _update_finish(self, result: Generation, token: int, opt: SamplingOptions, eos: int) -> None:
        if token == eos and not opt.ignore_eos:
            result.finish_reason = "stop"
            result.text = self._decode(result.token_ids, eos)
            return
        if opt.stop:
            text = self._decode(result.token_ids, eos)
            hits = [text.find(s) for s in opt.stop if s and s in text]
            if hits:
                result.finish_reason = "stop"
                result.text = text[: min(hits)]
                return
        if len(result.token_ids) >= opt.max_tokens:
            result.finish_reason = "length"

    def _decode(self, token_ids: Sequence[int], eos: int) -> str:
        ids = list(token_ids)
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator().manual_seed(seed)
