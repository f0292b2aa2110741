"""Bad numbers never kill a run: NaN logits, NaN rewards, exploding ratios and NaN losses are skipped and
counted; a run that keeps failing stops with a checkpoint. Also: EOS masking on a real step, and seeding."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GenerationConfig

import lightning_ppo.experience as experience_file
from lightning_ppo import update
from lightning_ppo.cli import main, run
from lightning_ppo.data import PromptDataModule
from lightning_ppo.module import PPOConfig, PPOModule
from lightning_ppo.nan_guard import BAD_STEPS_EXIT_CODE, STOP_CHECKPOINT
from lightning_ppo.rollout import SamplingConfig, sample_responses
from tests.helpers import RecordingLogger, cli_seed_args

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
BATCH, MINI_BATCH, EPOCHS = 8, 4, 2
OPTIMIZER_STEPS_PER_PPO_STEP = EPOCHS * BATCH // MINI_BATCH


def make_module(cls: type[PPOModule] = PPOModule, ratio_threshold: float = 10.0, **kwargs: Any) -> PPOModule:
    ppo = PPOConfig(
        ppo_epochs=EPOCHS, mini_batch_size=MINI_BATCH, init_kl_coef=0.05, ratio_threshold=ratio_threshold
    )
    return cls(
        policy="tiny:policy",
        reward_model="tiny:reward",
        learning_rate=1e-3,
        ppo=ppo,
        sampling=SamplingConfig(response_min_length=4, response_max_length=8),
        log_samples_every_n_steps=0,
        **kwargs,
    )


def fit(module: PPOModule, root: Path, steps: int = 2) -> tuple[Trainer, RecordingLogger]:
    """A few PPO steps of `module` on the tiny reviews, without validation."""
    logger = RecordingLogger()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    data = PromptDataModule(dataset="tiny:reviews", tokenizer="tiny:policy", batch_size=BATCH, val_size=BATCH)
    trainer.fit(module, data)
    return trainer, logger


def policy_state(module: PPOModule) -> dict[str, torch.Tensor]:
    return {name: weight.detach().clone() for name, weight in module.policy.state_dict().items()}


def assert_unchanged(module: PPOModule, before: dict[str, torch.Tensor]) -> None:
    for name, weight in module.policy.state_dict().items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=0, msg=name)


def nan_output(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return torch.full_like(output, float("nan"))


# ------------------------------------------------------------------------------------------------
# NaN logits


def test_finite_logits_prevent_the_multinomial_crash(tiny_assets: Path) -> None:
    module = make_module()
    lm, tokenizer = module.policy.lm, module.tokenizer
    lm.get_output_embeddings().register_forward_hook(nan_output)
    prompts = tokenizer(["the movie was", "a film"], padding=True, return_tensors="pt")
    raw = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(RuntimeError, match="probability tensor contains"):  # the notebook's crash
        lm.generate(**prompts, generation_config=raw)
    rollout = sample_responses(
        lm,
        prompts["input_ids"],
        prompts["attention_mask"],
        torch.tensor([4, 4]),
        module.sampling,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert rollout.response_ids.shape[0] == 2


def test_nan_logits_skip_the_batch_without_touching_the_weights(tiny_assets: Path, tmp_path: Path) -> None:
    module = make_module(max_consecutive_bad_steps=10)
    module.policy.lm.get_output_embeddings().register_forward_hook(nan_output)
    before = policy_state(module)
    trainer, logger = fit(module, tmp_path, steps=2)
    assert logger.metrics["ppo/skipped_batches"] == [1.0, 1.0]
    assert "env/reward_mean" not in logger.metrics
    assert trainer.global_step == 0
    assert_unchanged(module, before)


# ------------------------------------------------------------------------------------------------
# NaN rewards


def test_nan_reward_skips_the_batch_and_is_counted(tiny_assets: Path, tmp_path: Path) -> None:
    module = make_module()
    score = module.reward.forward
    calls = []

    def first_call_has_a_nan(texts: list[str], *queries_and_responses: list[str]) -> torch.Tensor:
        scores = score(texts, *queries_and_responses)
        if not calls:
            scores[3] = float("nan")
        calls.append(len(texts))
        return scores

    module.reward.forward = first_call_has_a_nan
    trainer, logger = fit(module, tmp_path, steps=2)
    assert logger.metrics["env/nan_rewards"] == [1.0, 0.0]
    assert logger.metrics["ppo/skipped_batches"] == [1.0, 0.0]
    assert len(logger.metrics["env/reward_mean"]) == 1  # only the good step trained
    assert trainer.global_step == OPTIMIZER_STEPS_PER_PPO_STEP
    assert logger.metrics["ppo/skipped_minibatches"] == [0.0]  # the default ratio_threshold skips none


# ------------------------------------------------------------------------------------------------
# Exploding ratio


def test_ratio_above_threshold_zeroes_the_minibatch_and_is_counted(tiny_assets: Path, tmp_path: Path) -> None:
    module = make_module(ratio_threshold=0.5)  # the mean ratio is ~1: every micro-batch "explodes"
    before = policy_state(module)
    _, logger = fit(module, tmp_path, steps=1)
    assert logger.metrics["ppo/skipped_minibatches"] == [float(OPTIMIZER_STEPS_PER_PPO_STEP)]
    assert_unchanged(module, before)  # zero loss: zero gradients, and Adam moves nothing from zero


# ------------------------------------------------------------------------------------------------
# NaN loss


class NaNLossModule(PPOModule):
    """Its loss is NaN on the minibatch calls listed in `nan_calls` (all when None)."""

    nan_calls: set[int] | None = None
    calls = 0

    def on_train_start(self) -> None:
        ppo_loss = update.ppo_loss

        def nan_loss(models, batch, config):
            loss, stats = ppo_loss(models, batch, config)
            bad = self.nan_calls is None or self.calls in self.nan_calls
            self.calls += 1
            return (loss * float("nan") if bad else loss), stats

        update.ppo_loss = nan_loss  # put back when training ends

    def on_train_end(self) -> None:
        update.ppo_loss = self._original_ppo_loss

    _original_ppo_loss = staticmethod(update.ppo_loss)


def adam_steps(module: PPOModule) -> list[int]:
    optimizer = module.trainer.optimizers[0]
    return [int(optimizer.state[p]["step"]) for p in module.policy.parameters() if p in optimizer.state]


def test_nan_loss_skips_the_optimizer_step_and_adam_state(tiny_assets: Path, tmp_path: Path) -> None:
    module = make_module(NaNLossModule)
    module.nan_calls = {1, 2}  # two bad minibatches in a row: fewer than max_consecutive_bad_steps=3
    trainer, logger = fit(module, tmp_path, steps=2)
    good_steps = 2 * OPTIMIZER_STEPS_PER_PPO_STEP - 2
    assert logger.metrics["ppo/skipped_optimizer_steps"] == [2.0, 0.0]
    assert trainer.global_step == good_steps
    assert set(adam_steps(module)) == {good_steps}  # Adam counted only the good steps
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert not trainer.should_stop


def test_consecutive_bad_steps_stop_the_run_with_a_checkpoint(
    tiny_assets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = make_module(NaNLossModule, max_consecutive_bad_steps=3)
    before = policy_state(module)
    with caplog.at_level(logging.ERROR, logger="lightning_ppo.nan_guard"):
        trainer, logger = fit(module, tmp_path, steps=3)
    assert trainer.should_stop
    assert logger.metrics["ppo/skipped_optimizer_steps"] == [float(OPTIMIZER_STEPS_PER_PPO_STEP)]  # 1 step
    assert adam_steps(module) == [] and trainer.global_step == 0
    assert_unchanged(module, before)
    path = tmp_path / "checkpoints" / STOP_CHECKPOINT
    assert path.is_file()
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["policy.v_head.weight"], before["v_head.weight"], rtol=0, atol=0)
    assert "model.max_consecutive_bad_steps=3" in caplog.text and str(path) in caplog.text


# ------------------------------------------------------------------------------------------------
# Early EOS and empty responses


def test_score_lands_on_eos_and_nothing_after_it(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = make_module()
    # scripted `generate` below: the loop would not call it
    module.sampling = SamplingConfig(response_min_length=6, response_max_length=6, engine="generate")
    eos, word = module.tokenizer.eos_token_id, module.tokenizer.convert_tokens_to_ids("Ġgreat")
    responses = torch.full((BATCH, 6), word)  # (B, 6) rows 2.. have no EOS
    responses[0, 2] = eos  # ends early: EOS third, then tokens that must not count
    responses[0, 3:] = word
    responses[1, 0] = eos  # an empty response: only EOS

    def fixed_generate(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.cat([input_ids, responses[: len(input_ids)]], dim=1)

    module.policy.lm.generate = fixed_generate
    seen = {}
    compute_rewards = experience_file.compute_rewards

    def recording_compute_rewards(scores, logprobs, ref_logprobs, mask, *args):
        out = compute_rewards(scores, logprobs, ref_logprobs, mask, *args)
        seen.update(scores=scores, mask=mask, rewards=out[0], non_score=out[1])
        return out

    monkeypatch.setattr(experience_file, "compute_rewards", recording_compute_rewards)
    fit(module, tmp_path, steps=1)

    mask, rewards, score_part = seen["mask"], seen["rewards"], seen["rewards"] - seen["non_score"]
    torch.testing.assert_close(mask[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(mask[1], torch.tensor([1.0, 0, 0, 0, 0, 0]))
    assert (mask[2:] == 1).all()
    last = torch.tensor([2, 0] + [5] * (BATCH - 2))
    expected = torch.zeros_like(score_part)
    expected[torch.arange(BATCH), last] = seen["scores"]
    torch.testing.assert_close(score_part, expected)  # the score sits on EOS (or the last token) only
    assert (rewards[mask == 0] == 0).all()  # after EOS: no reward at all


# ------------------------------------------------------------------------------------------------
# Same seed, same run


def reward_and_kl(root: Path) -> dict[str, list[float]]:
    cli = main(
        [
            "fit", "--config", TINY, *cli_seed_args(),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--trainer.val_check_interval", "3",
            "--data.batch_size", "16", "--data.val_size", "8", "--model.ppo.mini_batch_size", "8",
            "--trainer.logger.init_args.save_dir", str(root),
        ]
    )  # fmt: skip
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in ("env/reward_mean", "objective/kl")}


@pytest.mark.slow
def test_same_seed_gives_identical_rewards(tiny_assets: Path, tmp_path: Path) -> None:
    first, second = reward_and_kl(tmp_path / "a"), reward_and_kl(tmp_path / "b")
    assert len(first["env/reward_mean"]) == 3
    assert first == second


def test_a_run_stopped_for_bad_steps_exits_3_through_the_cli(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reward model that only returns NaN: every batch is skipped, the run stops, and the shell sees it."""
    reward = {"class_path": "lightning_ppo.rewards.FunctionReward"}
    reward["init_args"] = {"function": "tests.helpers.rewards:nan_score"}
    args = [
        "lightning-ppo", "fit", "--config", TINY, *cli_seed_args(),
        "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.batch_size", str(BATCH), "--model.ppo.mini_batch_size", str(MINI_BATCH),
        "--model.max_consecutive_bad_steps", "2", f"--model.reward={json.dumps(reward)}",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == BAD_STEPS_EXIT_CODE == 3
    (checkpoint,) = tmp_path.glob(f"tiny/version_0/checkpoints/{STOP_CHECKPOINT}")
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == (
        "lightning-ppo: error: stopped after 2 bad steps in a row (NaN/inf; see the log above); "
        f"last good state: {checkpoint}"
    )
