"""What a step logs: the share of responses cut at their limit, scores gathered once, local vs shared."""

from __future__ import annotations

import torch

from lightning_ppo.monitoring import StepMetrics, rollout_counts
from lightning_ppo.rollout import Rollout
from lightning_ppo.shaping import RunningMoments, Scores, ShapingConfig, shape_scores

EOS = 9


def test_cut_at_limit_counts_responses_that_reached_their_limit_without_eos() -> None:
    prompt = torch.ones(4, 2, dtype=torch.long)
    responses = torch.tensor([[3, 4, 5], [3, EOS, 0], [3, 4, EOS], [3, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]]).float()
    rollout = Rollout(
        input_ids=torch.cat([prompt, responses], 1),
        attention_mask=torch.cat([prompt, mask.long()], 1),
        response_start=2,
        response_mask=mask,
        length_limits=torch.tensor([3, 3, 3, 2]),
    )
    # row 0: limit 3 reached, no EOS; row 1: EOS; row 2: EOS at the limit; row 3: limit 2 reached
    assert rollout.has_eos(EOS).tolist() == [False, True, True, False]
    assert float(rollout_counts(rollout, EOS)["tokens/cut_at_limit"]) == 0.5
    assert "tokens/cut_at_limit" not in rollout_counts(
        Rollout(rollout.input_ids, rollout.attention_mask, 2, mask), EOS
    )


def test_scores_gathered_once_shape_with_every_ranks_moments() -> None:
    mine, theirs = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0])
    mine_eos, theirs_eos = torch.tensor([True, False]), torch.tensor([False, True])
    calls = []

    def two_ranks(x: torch.Tensor) -> torch.Tensor:  # what all_gather returns, rank 0 first
        calls.append(x.shape)
        other = torch.stack([theirs, theirs_eos.float()], -1)
        return torch.cat([x, other])

    scores = Scores.gather(mine, mine_eos, two_ranks)
    assert len(calls) == 1 and calls[0] == (2, 2)  # scores and EOS flags in one collective
    torch.testing.assert_close(scores.all, torch.tensor([1.0, 2.0, 5.0, 7.0]))
    assert scores.all_has_eos.tolist() == [True, False, False, True]
    config = ShapingConfig(missing_eos_penalty=1.0, score_scaling=True)
    moments = RunningMoments()
    shaped = shape_scores(scores.local, scores.has_eos, config, moments, scores.everyone())
    penalised_all = torch.tensor([1.0, 1.0, 4.0, 7.0], dtype=torch.float64)  # every rank's, penalised
    assert moments.mean == float(penalised_all.mean()) and moments.count == 4
    torch.testing.assert_close(shaped, torch.tensor([1.0, 1.0]) / (moments.std + torch.finfo().eps))


class OneRank:
    root_device = torch.device("cpu")

    def __init__(self) -> None:
        self.reductions = 0

    def reduce(self, x: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        self.reductions += 1
        return x


def test_reduced_metrics_take_one_reduction_and_keep_shared_ones() -> None:
    strategy = OneRank()
    metrics = StepMetrics(
        local={"a": torch.tensor(1.5), "b": torch.tensor(2)}, shared={"c": torch.tensor(3.0)}
    )
    metrics.add_local({"d": torch.tensor(4.0)})
    assert metrics.reduced(strategy) == {"c": 3.0, "a": 1.5, "b": 2.0, "d": 4.0}
    assert strategy.reductions == 1
