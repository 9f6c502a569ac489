"""The GenARM step against a float64 hand computation, on fresh random inputs (their seed is printed;
GENARM_TEST_SEED=N reproduces a run)."""

from __future__ import annotations

import math

import pytest
import torch

from server.fusion import WeightError, fused_logprobs, sample_next_tokens, validate_weight_value
from server.guidance import GuidanceSpec, unbounded_spec


@pytest.fixture(autouse=True)
def seeded(test_seed: int) -> None:
    torch.manual_seed(test_seed)  # every torch.randn / torch.rand below


def hand_fused(base: torch.Tensor, arms: list[torch.Tensor], weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """log p = log_softmax(z_b) + sum_k w_k log_softmax(z_k), renormalised; float64, explicit sums."""
    out = torch.empty(base.shape[0], vocab, dtype=torch.float64)
    for b in range(base.shape[0]):
        def logsm(z: torch.Tensor) -> torch.Tensor:
            z = z[:vocab].double()
            return z - torch.log(torch.exp(z - z.max()).sum()) - z.max()
        total = logsm(base[b])
        for k, arm in enumerate(arms):
            total = total + float(weights[b, k]) * logsm(arm[b])
        out[b] = total - torch.logsumexp(total, dim=0)
    return out


@pytest.mark.parametrize("trial", range(5))
def test_fused_step_matches_float64_hand_computation(trial: int, test_seed: int) -> None:
    gen = torch.Generator().manual_seed(test_seed + 1000 * trial)
    batch = int(torch.randint(1, 9, (), generator=gen))
    arms = int(torch.randint(1, 4, (), generator=gen))
    vocab = int(torch.randint(50, 400, (), generator=gen))
    base = torch.randn(batch, vocab + int(torch.randint(0, 40, (), generator=gen)), generator=gen) * 4
    arm_logits = [
        torch.randn(batch, vocab + int(torch.randint(0, 40, (), generator=gen)), generator=gen) * 4
        for _ in range(arms)
    ]
    weights = torch.rand(batch, arms, generator=gen) * 3
    weights[torch.rand(batch, arms, generator=gen) < 0.3] = 0.0  # zeros are allowed
    got = fused_logprobs(base, arm_logits, weights, vocab)
    want = hand_fused(base, arm_logits, weights, vocab)
    assert got.dtype == torch.float32 and got.shape == (batch, vocab)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # Renormalised: each row is a distribution.
    torch.testing.assert_close(
        got.double().exp().sum(-1), torch.ones(batch, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_each_row_uses_its_own_weight_row() -> None:
    base = torch.randn(1, 64).repeat(3, 1)
    arm = torch.randn(1, 64).repeat(3, 1)
    weights = torch.tensor([[0.0], [1.0], [5.0]])
    got = fused_logprobs(base, [arm], weights, 64)
    for b in range(3):
        one = fused_logprobs(base[b : b + 1], [arm[b : b + 1]], weights[b : b + 1], 64)
        torch.testing.assert_close(got[b : b + 1], one)
    assert not torch.allclose(got[0], got[1]) and not torch.allclose(got[1], got[2])


def test_zero_weights_give_the_base_distribution() -> None:
    base, arm = torch.randn(4, 100) * 3, torch.randn(4, 100) * 3
    got = fused_logprobs(base, [arm], torch.zeros(4, 1), 100)
    torch.testing.assert_close(got, torch.log_softmax(base, -1))
    assert torch.equal(got.argmax(-1), base.argmax(-1))


def test_zero_weight_ignores_an_arm_that_rules_tokens_out() -> None:
    base, arm = torch.randn(2, 30), torch.randn(2, 30)
    arm[:, 5] = float("-inf")
    got = fused_logprobs(base, [arm], torch.zeros(2, 1), 30)
    assert torch.isfinite(got).all()


def test_huge_weight_picks_that_arms_argmax() -> None:
    base = torch.randn(6, 80) * 5
    arms = [torch.randn(6, 80) * 5, torch.randn(6, 80) * 5]
    for k in range(2):
        weights = torch.zeros(6, 2)
        weights[:, k] = 1e4
        got = fused_logprobs(base, arms, weights, 80)
        assert torch.equal(got.argmax(-1), arms[k].argmax(-1))


def test_padding_rows_are_dropped_and_never_sampled() -> None:
    vocab, padded = 50, 64
    base = torch.randn(4, padded)
    arm = torch.randn(4, padded)
    base[:, vocab:] = 1e3  # untrained padding rows can hold anything
    arm[:, vocab:] = 1e3
    got = fused_logprobs(base, [arm], torch.full((4, 1), 2.0), vocab, out_width=padded)
    assert got.shape == (4, padded)
    assert torch.isneginf(got[:, vocab:]).all()
    # Truncation happens before the softmax: padding mass does not leak into real tokens.
    truncated = fused_logprobs(base[:, :vocab], [arm[:, :vocab]], torch.full((4, 1), 2.0), vocab)
    torch.testing.assert_close(got[:, :vocab], truncated)
    assert (got.argmax(-1) < vocab).all()
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for _ in range(50):
        tokens = sample_next_tokens(got, torch.full((4,), 1.5), torch.ones(4), torch.zeros(4, dtype=torch.long), gens)
        assert (tokens < vocab).all()


def test_fewer_logits_than_tokenizer_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        fused_logprobs(torch.randn(1, 40), [torch.randn(1, 30)], torch.ones(1, 1), 40)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad: float) -> None:
    weights = torch.tensor([[1.0], [bad]])
    with pytest.raises(WeightError, match="finite"):
        fused_logprobs(torch.randn(2, 10), [torch.randn(2, 10)], weights, 10)
    with pytest.raises(WeightError, match="finite"):
        validate_weight_value("harmless", bad)


def test_weight_rows_refuse_unknown_dimensions_and_non_numbers() -> None:
    assert unbounded_spec(["harmless", "helpful"]).row({"helpful": 2}) == [0.0, 2.0]
    with pytest.raises(WeightError, match="unknown reward dimension") as err:
        unbounded_spec(["harmless"]).row({"funny": 1.0})
    assert err.value.dimension == "funny"
    for bad in ("1.0", None, True, [1.0]):
        with pytest.raises(WeightError, match="must be a number"):
            unbounded_spec(["harmless"]).row({"harmless": bad})


def test_guidance_spec_rows_defaults_and_range() -> None:
    spec = GuidanceSpec(["harmless", "helpful"], [1.0, 0.0], min_weight=0.0, max_weight=5.0)
    assert spec.row(None) == [1.0, 0.0] and spec.row({}) == [0.0, 0.0]
    assert spec.row_from_extra_args({}) == [1.0, 0.0]  # no weight keys: the defaults
    assert spec.row_from_extra_args({"genarm_weight_helpful": 2}) == [0.0, 2.0]
    assert spec.extra_args({"harmless": 3}) == {"genarm_weight_harmless": 3.0, "genarm_weight_helpful": 0.0}
    with pytest.raises(WeightError, match="outside the allowed range"):
        spec.row({"helpful": 5.5})
    with pytest.raises(WeightError, match="outside the allowed range"):
        spec.row({"helpful": -0.1})


def test_sampling_greedy_top_k_top_p() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3), -1)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    seen: set[int] = set()
    for _ in range(200):
        out = sample_next_tokens(
            logprobs,
            temperature=torch.tensor([0.0, 1.0, 1.0]),
            top_p=torch.tensor([1.0, 1.0, 0.5]),
            top_k=torch.tensor([0, 2, 0]),
            generators=gens,
        )
        assert out[0] == 1  # greedy
        assert out[1] in (1, 3)  # top-2
        assert out[2] == 1  # p(token 1) = 0.64 > 0.5: the nucleus is that token alone
        seen.add(int(out[1]))
    assert seen == {1, 3}
    assert math.isclose(float(logprobs[0].exp().sum()), 1.0, rel_tol=1e-6)
