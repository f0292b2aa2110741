"""Score shaping math (running moments, EOS penalty, scaling, clipping) and its wiring in the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ppo.cli import main
from lightning_ppo.module import PPOModule
from lightning_ppo.rollout import Rollout
from lightning_ppo.shaping import RunningMoments, ShapingConfig, shape_scores
from tests.helpers import TINY, cli_seed_args, scalars, seeded

OFF = ShapingConfig()


@pytest.mark.parametrize("sizes", [(5,), (3, 7, 1, 16), (64, 64, 2)])
def test_running_moments_match_a_two_pass_mean_and_std_over_all_batches(sizes):
    generator = torch.Generator().manual_seed(seeded(len(sizes)))
    batches = [torch.randn(n, generator=generator) * 3 + 1.5 for n in sizes]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-9)
    if everything.numel() > 1:
        assert moments.std == pytest.approx(float(everything.std()), rel=1e-9)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.std, restored.count) == (moments.mean, moments.std, moments.count)


def test_shaping_is_the_identity_by_default():
    scores = torch.tensor([1.5, -2.0, 0.3])
    moments = RunningMoments()
    torch.testing.assert_close(shape_scores(scores, torch.tensor([True, False, True]), OFF, moments), scores)
    assert moments.count < 1  # untouched


def test_missing_eos_penalty_hits_only_responses_without_eos():
    scores = torch.tensor([1.0, 1.0, -1.0])
    has_eos = torch.tensor([True, False, False])
    shaped = shape_scores(scores, has_eos, ShapingConfig(missing_eos_penalty=2.0), RunningMoments())
    torch.testing.assert_close(shaped, torch.tensor([1.0, -1.0, -3.0]))


def test_scaling_normalisation_and_clipping_follow_the_running_moments():
    first, second = torch.tensor([1.0, 3.0, 5.0]), torch.tensor([10.0, -2.0])
    has_eos = torch.ones(3, dtype=torch.bool)
    scaling, norm = RunningMoments(), RunningMoments()
    shape_scores(first, has_eos, ShapingConfig(score_scaling=True), scaling)
    shaped = shape_scores(second, has_eos[:2], ShapingConfig(score_scaling=True), scaling)
    seen = torch.cat([first, second])
    torch.testing.assert_close(shaped, second / seen.std(), rtol=1e-5, atol=1e-6)

    config = ShapingConfig(score_scaling=True, score_norm=True, score_clip=0.5)
    shape_scores(first, has_eos, config, norm)
    shaped = shape_scores(second, has_eos[:2], config, norm)
    expected = ((second - seen.mean()) / seen.std()).clamp(-0.5, 0.5)
    torch.testing.assert_close(shaped, expected, rtol=1e-5, atol=1e-6)


def test_score_norm_alone_is_refused_with_the_key_names():
    with pytest.raises(ValueError, match=r"model\.shaping\.score_norm.*model\.shaping\.score_scaling"):
        ShapingConfig(score_norm=True)


def _rollout(eos_id: int) -> Rollout:
    """Two rows: the first response ends in EOS, the second is cut at its length without one."""
    input_ids = torch.tensor([[5, 6, 7, 8, eos_id], [5, 6, 9, 10, 11]])
    return Rollout(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        response_start=2,
        response_mask=torch.ones(2, 3),
    )


def test_the_module_shapes_scores_and_checkpoints_the_moments(tiny_assets: Path):
    shaping = ShapingConfig(missing_eos_penalty=1.0, score_scaling=True)
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward", shaping=shaping)
    rollout = _rollout(module.tokenizer.eos_token_id)
    has_eos = rollout.has_eos(module.tokenizer.eos_token_id)
    torch.testing.assert_close(has_eos, torch.tensor([True, False]))
    shaped = shape_scores(torch.tensor([2.0, 2.0]), has_eos, module.shaping, module.score_moments)
    penalised = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(shaped, penalised / penalised.std(), rtol=1e-5, atol=1e-6)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["score_moments"]["mean"] == pytest.approx(1.5)
    fresh = PPOModule(policy="tiny:policy", reward_model="tiny:reward", shaping=shaping)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.score_moments.state_dict() == module.score_moments.state_dict()


@pytest.mark.slow
def test_score_clip_in_a_fit_changes_the_optimised_scores_only(tiny_assets: Path, tmp_path: Path):
    def first_step(*overrides: str) -> dict[str, float]:
        cli = main(
            [
                "fit", "--config", TINY, *cli_seed_args(),
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.save_dir", str(tmp_path),
                *overrides,
            ]
        )  # fmt: skip
        return {name: values[0] for name, values in scalars(Path(cli.trainer.log_dir)).items()}

    plain, clipped = first_step(), first_step("--model.shaping.score_clip", "0.1")
    assert clipped["env/reward_mean"] == plain["env/reward_mean"]  # same rollout, same raw reward
    assert abs(clipped["ppo/mean_scores"]) <= 0.1 < abs(plain["ppo/mean_scores"])
