"""Critic-free estimators end to end on the tiny demo: the reward rises, and no value head exists anywhere.

One fit per estimator (module-scoped), k = 4 samples per prompt; grpo runs with its KL in the loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.estimators import demo_fit_args
from lightning_ppo.cli import main
from tests.helpers import assert_reward_rose, cli_seed_args, scalars

pytestmark = pytest.mark.slow
STEPS, PROMPTS, K = 20, 16, 4
KL_IN = {"grpo": "loss", "rloo": "reward", "reinforce_pp": "reward"}


@pytest.fixture(scope="module", params=list(KL_IN))
def fit(request: pytest.FixtureRequest, tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    estimator = request.param
    root = tmp_path_factory.mktemp(estimator)
    cli = main([*demo_fit_args(str(root), STEPS, PROMPTS, K, estimator, KL_IN[estimator]), *cli_seed_args()])
    return estimator, cli, scalars(Path(cli.trainer.log_dir))


def test_each_estimator_raises_the_reward(fit):
    estimator, _, logged = fit
    assert len(logged["env/reward_mean"]) == STEPS
    assert_reward_rose(logged)


def test_critic_free_runs_hold_no_value_head(fit):
    estimator, cli, _ = fit
    module = cli.model
    assert module.policy.v_head is None and module.critic is None
    assert not [key for key in module.state_dict() if "v_head" in key or key.startswith("critic")]
    policy_params = {id(p) for p in module.policy.parameters() if p.requires_grad}
    (optimizer,) = cli.trainer.optimizers
    optimized = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(optimizer.param_groups) == 1 and set(optimized) == policy_params == {
        id(p) for p in optimizer.state
    }
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert not [key for key in saved["state_dict"] if "v_head" in key], estimator
    assert len(saved["optimizer_states"][0]["param_groups"][0]["params"]) == len(policy_params)


def test_no_value_metrics_and_the_kl_where_it_was_asked(fit):
    estimator, _, logged = fit
    assert not [tag for tag in logged if tag.startswith(("ppo/val/", "ppo/returns/", "ppo/loss/value"))]
    if KL_IN[estimator] == "loss":
        assert logged["objective/kl_coef"] == [0.0] * STEPS  # no KL in the reward, no controller
        assert logged["ppo/policy/kl_loss"][-1] > 0
        assert logged["ppo/mean_non_score_reward"] == [0.0] * STEPS
    else:
        assert "ppo/policy/kl_loss" not in logged
        assert logged["ppo/mean_non_score_reward"][-1] < 0
