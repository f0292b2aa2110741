"""A separate critic: values for the policy's response tokens, its own learning rate, vocabulary check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from lightning_ppo.cli import main
from lightning_ppo.models import ValueModel, build_critic, load_tokenizer
from lightning_ppo.module import PPOModule
from tests.helpers import TINY, cli_seed_args, scalars


def test_the_critic_gives_the_values_and_has_its_own_learning_rate(tiny_assets: Path):
    module = PPOModule(
        policy="tiny:policy", reward_model="tiny:reward", critic="tiny:policy", critic_learning_rate=5e-4
    )
    assert module.policy.v_head is None  # no value head on the policy trunk
    encoded = module.tokenizer(["the movie was great", "this film"], return_tensors="pt", padding=True)
    args = (encoded.input_ids, encoded.attention_mask, 2)
    with torch.no_grad():
        _, values = module.models.logits_and_values(*args)
        torch.testing.assert_close(values, module.critic(*args))
    assert values.shape == (2, encoded.input_ids.shape[1] - 2)
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [module.hparams.learning_rate, 5e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.critic.parameters()}


def test_a_critic_with_another_tokenizer_is_refused(tiny_assets: Path):
    tokenizer = load_tokenizer("tiny:policy")
    with pytest.raises(ValueError, match=r"model\.critic='tiny:reward'.*different tokenizer"):
        build_critic("tiny:reward", "tiny:reward", tokenizer)
    with pytest.raises(ValueError, match=r"model\.critic='reward_model' \(tiny:reward\)"):
        build_critic("reward_model", "tiny:reward", tokenizer)


def test_reward_model_critic_starts_from_the_reward_models_backbone(tiny_assets: Path):
    critic = build_critic("reward_model", "tiny:policy", load_tokenizer("tiny:policy"))
    expected = AutoModel.from_pretrained(tiny_assets / "policy").state_dict()
    assert isinstance(critic, ValueModel)
    for name, weight in critic.backbone.state_dict().items():
        torch.testing.assert_close(weight, expected[name], rtol=0, atol=0)


@pytest.mark.slow
def test_fit_with_a_separate_critic_trains_and_checkpoints_it(tiny_assets: Path, tmp_path: Path):
    cli = main(
        [
            "fit", "--config", TINY, *cli_seed_args(), "--trainer.max_epochs", "1",
            "--model.critic", "tiny:policy", "--model.critic_learning_rate", "1e-3",
            "--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    start = AutoModel.from_pretrained(tiny_assets / "policy").state_dict()
    tuned = cli.model.critic.backbone.state_dict()
    assert any(not torch.equal(tuned[k], v) for k, v in start.items()), "critic did not change"
    assert "ppo/val/error" in scalars(Path(cli.trainer.log_dir))
    path = tmp_path / "final.ckpt"
    cli.trainer.save_checkpoint(path)
    keys = torch.load(path, map_location="cpu", weights_only=False)["state_dict"].keys()
    assert "critic.v_head.weight" in keys and not any(k.startswith("policy.v_head") for k in keys)
