"""Exact resume: 3 PPO steps, stop, resume for 3 more == 6 steps uninterrupted; and the loader's position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset

from lightning_ppo.checkpointing import AtomicCheckpointIO
from lightning_ppo.cli import main
from lightning_ppo.resumable import resumable_loader
from tests.helpers import cli_seed_args

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
OPT_STEPS_PER_PPO_STEP = 8  # 4 PPO epochs x (16 / 8) minibatches
COMPARED = ("env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/loss/policy")


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def fit(root: Path, *args: str):
    """A tiny fit of at most 6 PPO steps of 16 prompts, checkpointing after every PPO step."""
    return main(
        [
            "fit", "--config", TINY, *cli_seed_args(),
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "6",
            "--trainer.val_check_interval", "3",  # runs right after the checkpoint the resume starts from
            "--data.val_size", "8",
            "--data.batch_size", "16",
            "--model.ppo.mini_batch_size", "8",
            "--model.log_samples_every_n_steps", "0",
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks.init_args.every_n_train_steps", str(OPT_STEPS_PER_PPO_STEP),
            *args,
        ]
    )  # fmt: skip


def critic_free(estimator: str, kl_in: str = "reward") -> list[str]:
    """The same 16 rows per PPO step as 8 prompts x 2 samples."""
    return [
        "--model.ppo.advantage_estimator", estimator, "--model.ppo.kl_in", kl_in,
        "--data.batch_size", "8", "--model.sampling.num_samples_per_prompt", "2",
    ]  # fmt: skip


ESTIMATORS = {
    "gae": [],
    "grpo": critic_free("grpo", kl_in="loss"),
    "rloo": critic_free("rloo"),
    "reinforce_pp": critic_free("reinforce_pp"),
}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_resumed_fit_logs_what_an_uninterrupted_one_does(tiny_assets: Path, tmp_path: Path, estimator: str):
    args = ESTIMATORS[estimator]
    whole = fit(tmp_path / "whole", *args)
    first = fit(tmp_path / "resumed", *args, "--trainer.max_steps", str(3 * OPT_STEPS_PER_PPO_STEP))
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3 * OPT_STEPS_PER_PPO_STEP
    resumed = fit(tmp_path / "resumed", *args, "--ckpt_path", str(last))

    assert resumed.trainer.global_step == whole.trainer.global_step == 6 * OPT_STEPS_PER_PPO_STEP
    assert isinstance(resumed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed by default
    expected, got = scalars(Path(whole.trainer.log_dir)), scalars(Path(resumed.trainer.log_dir))
    for name in COMPARED:
        assert sorted(got[name]) == [3, 4, 5], name  # the resumed run logged PPO steps 4-6 only
        for step in (3, 4, 5):
            assert got[name][step] == pytest.approx(expected[name][step], abs=1e-6), (name, step)
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    for key, weight in whole_state.items():
        torch.testing.assert_close(resumed_state[key], weight, rtol=0, atol=1e-6)


class Numbers(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def test_a_restored_loader_hands_out_the_rest_of_its_epoch_once():
    loader = resumable_loader(Numbers(), batch_size=4, seed=3, world={})
    loader.sampler.set_epoch(2)
    full_epoch = [batch.tolist() for batch in loader]
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = loader.state_dict()

    restored = resumable_loader(Numbers(), batch_size=4, seed=3, world={})
    restored.load_state_dict(state)
    restored.sampler.set_epoch(2)
    rest = [batch.tolist() for batch in restored]
    assert seen + rest == full_epoch
    assert len(restored) == len(full_epoch)  # Lightning counts the epoch's length from the start
    assert [batch.tolist() for batch in restored] == full_epoch  # the skip applies to one pass only

    restored.load_state_dict(state)
    restored.sampler.set_epoch(3)  # a state from another epoch is not applied
    assert len([batch for batch in restored]) == len(full_epoch)


def test_ranks_share_an_epoch_without_overlap():
    shares = [resumable_loader(Numbers(), 4, 0, {"num_replicas": 2, "rank": rank}) for rank in (0, 1)]
    indices = [sorted(i for batch in loader for i in batch.tolist()) for loader in shares]
    assert not set(indices[0]) & set(indices[1])
    assert sorted(indices[0] + indices[1]) == list(range(40))
