"""DeepSpeed ZeRO-2/3 in-process: the shipped configs, the DeepSpeed config the module writes, the frozen
models kept out of the engine, and ZeRO-3 generation (gather once, synced_gpus). The real 2-process runs
(fit, resume, export, test) are in tests/e2e/test_deepspeed_runs.py.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy

from lightning_ppo import parallel
from lightning_ppo.cli import main
from lightning_ppo.config import PPOConfig
from lightning_ppo.data import collate_prompts
from lightning_ppo.module import PPOModule
from lightning_ppo.parallel import (
    PPODeepSpeedStrategy,
    configure_deepspeed,
    gathered_for_generation,
    zero_stage,
)
from lightning_ppo.rollout import draw_response_lengths
from tests.helpers import cli_seed_args

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "configs"


def strategy_from_configs(
    capsys: pytest.CaptureFixture[str], *configs: str
) -> tuple[DeepSpeedStrategy, dict]:
    """The strategy the CLI would build from the layered configs, and the resolved trainer section."""
    args = [arg for config in configs for arg in ("--config", str(CONFIGS / config))]
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    printed = capsys.readouterr().out
    trainer = yaml.safe_load(printed[printed.index("# lightning") :])["trainer"]  # after DeepSpeed's log line
    return instantiate_class((), trainer["strategy"]), trainer


def format_like_lightning(strategy: DeepSpeedStrategy, precision: str) -> dict:
    """Lightning's own DeepSpeed config formatting (in `strategy.setup`, after the module's `setup`)."""
    strategy.precision_plugin = DeepSpeedPrecision(precision)
    strategy._lightning_module = SimpleNamespace(
        trainer=SimpleNamespace(accumulate_grad_batches=1, gradient_clip_val=None)
    )
    strategy._format_config()
    return strategy.config


@pytest.mark.parametrize("stage", [2, 3])
def test_layered_configs_give_a_bf16_deepspeed_strategy_that_clips(stage: int, capsys):
    strategy, trainer = strategy_from_configs(capsys, "gpt2.yaml", f"deepspeed_zero{stage}.yaml")
    assert isinstance(strategy, PPODeepSpeedStrategy) and zero_stage(strategy) == stage
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"

    # what PPOModule.setup does: model.ppo.max_grad_norm and model.ppo.mini_batch_size
    configure_deepspeed(strategy, PPOConfig(max_grad_norm=1.0, mini_batch_size=4))
    config = format_like_lightning(strategy, trainer["precision"])
    assert (
        config["train_micro_batch_size_per_gpu"] == 4
    )  # else Lightning asks the train dataloader (not in test)
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"] == {"enabled": True}
    assert config["gradient_clipping"] == 1.0  # survives Lightning's default of 0.0
    assert config["managed_gradient_accumulation"] is False  # step() is the boundary, not a micro-step count
    assert config["gradient_accumulation_steps"] == 1


def test_no_max_grad_norm_means_no_clipping_and_a_conflict_is_refused(capsys):
    strategy, _ = strategy_from_configs(capsys, "gpt2.yaml", "deepspeed_zero2.yaml")
    configure_deepspeed(strategy, PPOConfig(mini_batch_size=1))
    assert strategy.config["gradient_clipping"] == 0.0

    conflicting = DeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5})
    with pytest.raises(ValueError, match=r"model\.ppo\.max_grad_norm"):
        configure_deepspeed(conflicting, PPOConfig(max_grad_norm=1.0, mini_batch_size=1))
    with pytest.raises(ValueError, match=r"trainer\.strategy\.init_args\.stage"):
        configure_deepspeed(DeepSpeedStrategy(stage=1), PPOConfig(mini_batch_size=1))


def test_several_backwards_per_step_are_refused_under_zero3_only(capsys):
    for stage in (2, 3):
        strategy, _ = strategy_from_configs(capsys, "gpt2.yaml", f"deepspeed_zero{stage}.yaml")
        if stage == 2:
            configure_deepspeed(strategy, PPOConfig(mini_batch_size=1, max_tokens_per_microbatch=512))
        else:
            with pytest.raises(ValueError, match=r"model\.ppo\.max_tokens_per_microbatch.*ZeRO-2"):
                configure_deepspeed(strategy, PPOConfig(mini_batch_size=1, max_tokens_per_microbatch=512))
            with pytest.raises(ValueError, match=r"model\.ppo\.gradient_accumulation_steps.*ZeRO-2"):
                configure_deepspeed(strategy, PPOConfig(mini_batch_size=1, gradient_accumulation_steps=2))


@pytest.fixture(scope="module")
def module(tiny_assets: Path) -> PPOModule:
    return PPOModule(policy="tiny:policy", reward_model="tiny:reward")


def test_frozen_models_are_not_children_the_engine_would_wrap(module: PPOModule):
    assert [name for name, _ in module.named_children()] == ["policy"]
    engine_sees = {id(p) for p in module.parameters()}
    frozen = [*module.ref_policy.parameters(), *module.reward.parameters()]
    assert frozen and not engine_sees & {id(p) for p in frozen}
    assert all(key.startswith(("policy.lm.", "policy.v_head.")) for key in module.state_dict())
    assert "policy.v_head.weight" in module.state_dict()


def test_frozen_models_follow_the_policy_dtype_only_when_placed(tiny_assets: Path):
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward")
    module.to(torch.bfloat16)  # what an engine's cast does to the module it wraps
    assert next(module.ref_policy.parameters()).dtype == torch.float32  # not cast by accident

    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module._place_frozen_models()  # on_fit_start etc.: deliberately match the policy
    assert {p.dtype for p in module.ref_policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.reward.parameters()} == {torch.bfloat16}


class FakeHook:
    def __init__(self) -> None:
        self.removed = False

    def remove(self) -> None:
        self.removed = True


def fake_zero3_strategy(policy: torch.nn.Module) -> tuple[DeepSpeedStrategy, SimpleNamespace]:
    """A real ZeRO-3 DeepSpeedStrategy whose engine is a stand-in holding ZeRO-3's hook bookkeeping."""
    for param in policy.parameters():
        param.ds_active_sub_modules = {1}
    offload = SimpleNamespace(
        module=policy, forward_hooks=[FakeHook()], backward_hooks=[FakeHook()], registered=0
    )

    def register(module: torch.nn.Module) -> None:
        offload.registered += 1

    offload._register_deepspeed_module = register
    strategy = DeepSpeedStrategy(stage=3)
    strategy.model = SimpleNamespace(optimizer=SimpleNamespace(parameter_offload=offload))
    return strategy, offload


def test_zero3_rollout_gathers_once_and_generates_with_synced_gpus(module: PPOModule, monkeypatch):
    strategy, offload = fake_zero3_strategy(module.policy)
    gathers: list[int] = []

    @contextmanager
    def counting_gather(params, modifier_rank=None):
        gathers.append(len(list(params)))
        yield

    monkeypatch.setattr("deepspeed.zero.GatheredParameters", counting_gather)
    generate_calls: list[dict] = []
    original_generate = module.policy.lm.generate

    def recording_generate(**kwargs):
        generate_calls.append({**kwargs, "hooks_paused": not offload.forward_hooks})
        return original_generate(**{**kwargs, "synced_gpus": False})  # one process: nothing to sync with

    monkeypatch.setattr(module.policy.lm, "generate", recording_generate)
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(strategy=strategy))
    tokenizer = module.tokenizer
    prompts = ["the movie was", "this film", "i saw it"]
    batch = collate_prompts(
        [{"input_ids": tokenizer(p)["input_ids"], "query": p} for p in prompts], tokenizer.pad_token_id
    )
    lengths = draw_response_lengths(len(prompts), module.sampling, module.device)

    rollout = module.generate_rollout(module.policy.lm, batch, lengths)
    assert rollout.response_mask.shape[1] == int(lengths.max())  # several tokens...
    assert gathers == [len(list(module.policy.parameters()))]  # ...one gather of the whole policy
    assert [call["synced_gpus"] for call in generate_calls] == [True]
    assert generate_calls[0]["hooks_paused"]
    assert offload.registered == 1  # hooks are back for the PPO epochs

    module.generate_rollout(module.ref_policy, batch, lengths)  # the reference is not sharded: no gather
    assert len(gathers) == 1


def test_without_zero3_generation_is_untouched(module: PPOModule):
    for strategy in (None, DeepSpeedStrategy(stage=2)):
        with gathered_for_generation(strategy, module.policy) as synced_gpus:
            assert synced_gpus is False
    assert parallel.zero_stage(None) == 0


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed needs a CUDA device")
@pytest.mark.parametrize("stage", [2, 3])
def test_tiny_fit_on_gpu_with_deepspeed(stage: int, tiny_assets: Path, tmp_path: Path):
    command = [
        sys.executable, "-m", "lightning_ppo", "fit",
        "--config", str(CONFIGS / "tiny.yaml"), *cli_seed_args(),
        "--config", str(CONFIGS / f"deepspeed_zero{stage}.yaml"),
        "--trainer.devices", str(min(torch.cuda.device_count(), 2)),
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4", "--trainer.val_check_interval", "4",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.ppo.max_grad_norm", "1.0",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert list(tmp_path.glob("tiny/version_0/checkpoints/last.ckpt"))
