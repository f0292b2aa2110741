"""The PPO LightningModule: Lightning's hooks and the wiring of one PPO iteration per training step: sample
(`generation`), score (`rewards`), experience (`experience`), PPO epochs (`update`), KL controller, log
(`monitoring`). Evaluation is in `evaluation`, the math in `core`; this file holds no formula."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn

from lightning_ppo.checkpointing import SafeCheckpoints, load_training_state, save_training_state
from lightning_ppo.config import MODULE_ARGS, PPOConfig
from lightning_ppo.core import kl_controller
from lightning_ppo.data import check_prompt_settings, repeat_prompts
from lightning_ppo.errors import check_number
from lightning_ppo.evaluation import Evaluator, JsonlPredictionWriter
from lightning_ppo.experience import ForwardPasses, experience_from_scores, forward_passes
from lightning_ppo.generation import GenerationEngine, LazyEngine
from lightning_ppo.lora import LoraOptions
from lightning_ppo.models import FrozenModels, build_models, eval_mode
from lightning_ppo.monitoring import (
    IterationResult,
    PhaseTimer,
    StepClock,
    StepMetrics,
    iteration_result,
    log_samples,
    rollout_counts,
)
from lightning_ppo.nan_guard import BadNumberGuard
from lightning_ppo.packing import TokenBudget
from lightning_ppo.parallel import (
    clips_in_engine,
    configure_deepspeed,
    gather_flat,
    gathered_for_generation,
    local_gradients,
    max_over_ranks,
    no_backward_sync,
)
from lightning_ppo.rewards import ClassifierReward, RewardModel, score_rollout
from lightning_ppo.rollout import Rollout, SamplingConfig, draw_response_lengths, rollout_from_token_lists
from lightning_ppo.shaping import RunningMoments, Scores, ShapingConfig
from lightning_ppo.update import UpdateContext, ppo_epochs

__all__ = ["PPOConfig", "PPOModule"]  # PPOConfig: checkpoints pickled before 0.2 name it here


class PPOModule(LightningModule):
    """PPO fine-tuning of a causal LM against a reward model, with a frozen reference for the KL penalty."""

    def __init__(
        self,
        policy: str = "lvwerra/gpt2-imdb",
        reward_model: str = "lvwerra/distilbert-imdb",
        reward_label: str = "POSITIVE",
        reward_batch_size: int | None = None,
        learning_rate: float = 1.41e-5,
        ppo: PPOConfig | None = None,
        sampling: SamplingConfig | None = None,
        forward_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        log_samples_every_n_steps: int = 10,
        num_log_samples: int = 8,
        max_consecutive_bad_steps: int = 3,
        reward: RewardModel | None = None,
        lora: LoraOptions | None = None,
        critic: str | None = None,
        critic_learning_rate: float | None = None,
        shaping: ShapingConfig | None = None,
        fp32_lm_head: bool | None = None,
    ) -> None:
        super().__init__()
        # numbers first, so that a bad one fails before any model is loaded
        check_number("model.reward_batch_size", reward_batch_size, 1, integer=True, optional=True)
        check_number("model.forward_batch_size", forward_batch_size, 1, integer=True, optional=True)
        check_number("model.learning_rate", learning_rate, 0, open_low=True)
        check_number("model.critic_learning_rate", critic_learning_rate, 0, open_low=True, optional=True)
        check_number("model.log_samples_every_n_steps", log_samples_every_n_steps, 0, integer=True)
        check_number("model.num_log_samples", num_log_samples, 1, integer=True)
        check_number("model.max_consecutive_bad_steps", max_consecutive_bad_steps, 1, integer=True)
        self.ppo = ppo or PPOConfig()
        self.sampling = sampling or SamplingConfig()
        self.ppo.check_estimator(self.sampling.num_samples_per_prompt, critic)
        self.shaping = shaping or ShapingConfig()
        self.save_hyperparameters(ignore=["reward"])  # a module: its config is in the CLI's config.yaml
        self.automatic_optimization = False
        self.tokenizer, self.models = build_models(
            policy, reward_model, lora, critic, self.ppo.critic_free, disable_dropout, gradient_checkpointing
        )
        self.models.temperature = self.sampling.temperature
        self.policy, self.critic = self.models.policy, self.models.critic
        reward = reward or ClassifierReward(reward_model, reward_label, reward_batch_size)
        self._frozen = FrozenModels(reward, self.models.reference)  # not children the strategy would wrap
        self.score_moments = RunningMoments()
        ppo = self.ppo
        self.kl_ctl = kl_controller(ppo.adap_kl_ctrl, ppo.init_kl_coef, ppo.target, ppo.horizon)
        self.bad_numbers = BadNumberGuard(max_consecutive_bad_steps)
        self.evaluator = Evaluator()
        self._clock = StepClock()
        self._engine = LazyEngine(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)

    __init__.__doc__ = MODULE_ARGS  # the `model.*` keys' help, for `fit --help` and docs/configuration.md

    @property
    def ref_policy(self) -> torch.nn.Module | None:
        """The frozen reference; None with LoRA, whose policy with the adapter disabled is the reference."""
        return self._frozen.reference

    @property
    def reward(self) -> RewardModel:
        return self._frozen.reward

    @property
    def update_context(self) -> UpdateContext:
        """How the PPO epochs reach the optimizer and the other ranks, through Lightning."""
        strategy = self.trainer.strategy
        return UpdateContext(
            backward=self.manual_backward,
            no_sync=partial(no_backward_sync, strategy),  # skips DDP's all-reduce unless given True
            optimizer_step=self._optimizer_step,
            mean_over_ranks=partial(strategy.reduce, reduce_op="mean"),
            max_over_ranks=partial(max_over_ranks, strategy),
            gradients=None if clips_in_engine(strategy) else partial(local_gradients, self.optimizers()),
        )

    def configure_callbacks(self) -> list[Callback]:
        return [JsonlPredictionWriter(), SafeCheckpoints()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam (DeepSpeed takes one optimizer): the policy's trainable weights, then the critic's."""
        lrs = self._learning_rates()
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": lrs[0]}]
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "lr": lrs[1]})
        return torch.optim.Adam(groups, lr=lrs[0])

    def _learning_rates(self) -> list[float]:
        """The learning rate of each parameter group: the policy's, then the critic's if there is one."""
        lr = self.hparams.learning_rate
        return [lr] if self.critic is None else [lr, self.hparams.critic_learning_rate or lr]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            policy = self.hparams.policy
            check_prompt_settings(datamodule, stage, self.ppo, self.sampling, self.policy.lm, policy)
        # TRL's micro-batch is a whole minibatch: gradient accumulation stacks minibatches
        configure_deepspeed(self.trainer.strategy, self.ppo)
        fp32_head, bf16 = self.hparams.fp32_lm_head, "bf16" in str(self.trainer.precision)
        self.models.use_float32_heads(bf16 if fp32_head is None else fp32_head)

    def on_fit_start(self) -> None:
        self._place_frozen_models()
        if self.trainer.world_size > 1:
            # seed_everything gives every rank the same seed: without an offset all ranks would draw the
            # same response lengths and sampling noise. (A resumed run then restores each rank's own state.)
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path is not None:  # Adam's state was restored with the checkpoint's rates
            for group, lr in zip(self.optimizers().param_groups, self._learning_rates(), strict=True):
                group["lr"] = lr  # this run's apply (lightning_ppo.resume)
            self._engine.weights_changed()
        self._clock.restart()

    def on_validation_start(self) -> None:
        self._place_frozen_models()

    def on_validation_end(self) -> None:
        self._clock.restart()  # evaluation is not part of the next training step

    def on_test_start(self) -> None:
        self._place_frozen_models()

    def on_predict_start(self) -> None:
        self._place_frozen_models()

    def _place_frozen_models(self) -> None:
        """On this rank's device, in the policy's dtype (DeepSpeed's bf16 casts it): the KL starts at 0."""
        self._frozen.place(self.trainer.strategy.root_device, next(self.policy.lm.parameters()).dtype)

    def train(self, mode: bool = True) -> PPOModule:
        """Frozen models stay in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self._frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_training_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_training_state(self, checkpoint)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One PPO iteration on a batch of B prompts: B x k rows, k = `sampling.num_samples_per_prompt`."""
        timer, k = PhaseTimer(self.device), self.sampling.num_samples_per_prompt
        with timer("rollout"):  # 1. sample k responses per prompt (a group shares its length limit)
            batch = repeat_prompts(batch, k)
            lengths = draw_response_lengths(len(batch["query"]) // k, self.sampling, self.device)
            rollout = self.generate_rollout(self.policy.lm, batch, lengths.repeat_interleave(k))
        with timer("reward"):  # 2. score each prompt + response
            scores, samples = score_rollout(self.reward, self.tokenizer, rollout, batch)
        result = self._ppo_iteration(rollout, scores, timer)  # 3.-6. experience, PPO epochs, KL controller
        result.metrics.add_local(rollout_counts(rollout, self.tokenizer.eos_token_id), self._clock.lap(timer))
        result.metrics.log(self)  # 7. log
        every, rows = self.hparams.log_samples_every_n_steps, self.hparams.num_log_samples
        log_samples(self.trainer, samples, result, every, rows)  # a table, histograms
        self.bad_numbers.stop_if_failing(self.trainer)

    def step(
        self, queries: list[Tensor], responses: list[Tensor], scores: list[Tensor] | Tensor
    ) -> dict[str, float]:
        """Steps 3-6 on your own samples (1-D token-id tensors) and scores, as TRL's `PPOTrainer.step`;
        TRL's statistics averaged over ranks. Call it from a `training_step`; for grpo and rloo, rows
        [g*k, (g+1)*k) must be one prompt's k samples."""
        if not len(queries) == len(responses) == len(scores):
            raise ValueError(
                f"step needs as many queries, responses and scores, got {len(queries)}, {len(responses)} "
                f"and {len(scores)}"
            )
        self.ppo.check_batch_size(len(queries), key="the number of rows given to PPOModule.step")
        rollout = rollout_from_token_lists(queries, responses, self.tokenizer.pad_token_id, self.device)
        scores = torch.stack([torch.as_tensor(score, dtype=torch.float32).reshape(()) for score in scores])
        result = self._ppo_iteration(rollout, scores.to(self.device), PhaseTimer(self.device))
        self.bad_numbers.stop_if_failing(self.trainer)
        return result.metrics.reduced(self.trainer.strategy)

    def _ppo_iteration(self, rollout: Rollout, raw_scores: Tensor, timer: PhaseTimer) -> IterationResult:
        """Steps 3-6 of a PPO iteration on a scored rollout (groups of k rows)."""
        strategy, ppo = self.trainer.strategy, self.ppo
        with timer("forward"):  # 3. old log-probs and values, reference log-probs
            passes = self._forward_passes(rollout, full_kl=ppo.kl_penalty == "full")
        usable, faults = self.bad_numbers.check_rollout(strategy, raw_scores, *passes.per_token)
        if not usable:  # NaN/inf rewards, log-probs or values: skip the batch (lightning_ppo.nan_guard)
            return IterationResult(StepMetrics(local=faults))
        has_eos = rollout.has_eos(self.tokenizer.eos_token_id)
        scores = Scores.gather(raw_scores, has_eos, partial(gather_flat, strategy))
        kl_coef = self.kl_ctl.value if ppo.kl_in == "reward" else 0.0  # "loss": the KL is in ppo_loss
        k, sum_over_ranks = self.sampling.num_samples_per_prompt, partial(strategy.reduce, reduce_op="sum")
        shaped, rewards, experience = experience_from_scores(  # 4. per-token rewards, then advantages
            rollout, passes, scores, kl_coef, ppo, self.shaping, self.score_moments, k, sum_over_ranks
        )
        with timer("optimize"):  # 5. PPO epochs over shuffled minibatches
            update_stats = ppo_epochs(self.models, experience, ppo, self.update_context)
        lr, skipped = self.optimizers().param_groups[0]["lr"], self.bad_numbers.pop_skipped_optimizer_steps()
        optimizer = {"ppo/learning_rate": torch.tensor(float(lr)), "ppo/skipped_optimizer_steps": skipped}
        local = {**optimizer, **update_stats, **faults, **timer.metrics()}
        result = iteration_result(rollout, passes, rewards, scores, shaped, kl_coef, local, strategy)
        if ppo.kl_in == "reward":  # 6. the KL controller, the same on every rank: the KL averaged over ranks
            mean_kl, rows = result.metrics.shared["objective/kl"], rollout.response_mask.shape[0]
            self.kl_ctl.update(float(mean_kl), rows * self.trainer.world_size)
        return result

    def _optimizer_step(self, step_loss: Tensor) -> None:
        """Step the optimizer unless the step's loss is NaN/inf on some rank; clip first if asked."""
        optimizer = self.optimizers()
        if self.bad_numbers.step_is_finite(self.trainer.strategy, step_loss):  # else skip the step
            if self.ppo.max_grad_norm is not None and not clips_in_engine(self.trainer.strategy):
                self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm)
            optimizer.step()
            self._engine.weights_changed()
        optimizer.zero_grad()

    @property
    def engine(self) -> GenerationEngine:
        """This rank's generation engine (`model.sampling.engine`), built on first use."""
        return self._engine.get(self.sampling, self.policy.lm)

    def generate_rollout(self, model: nn.Module, batch: dict[str, Any], lengths: Tensor) -> Rollout:
        """`model`'s responses to the batch's prompts, row i at most `lengths[i]` tokens."""
        strategy = self._trainer.strategy if self._trainer is not None and model is self.policy.lm else None
        with eval_mode(model), gathered_for_generation(strategy, self.policy) as synced_gpus:
            return self.engine.sample(
                model, batch["input_ids"], batch["attention_mask"], lengths, self.sampling, synced_gpus
            )

    def _forward_passes(self, rollout: Rollout, full_kl: bool = False) -> ForwardPasses:
        buckets = self.ppo.length_buckets if self.ppo.packing else None
        agree = partial(max_over_ranks, self.trainer.strategy)
        budget = TokenBudget.at_most(self.ppo.max_tokens_per_microbatch, agree)
        return forward_passes(self.models, rollout, self.hparams.forward_batch_size, full_kl, buckets, budget)

    def sequence_kl(self, rollout: Rollout) -> Tensor:
        """Sampled KL(policy || reference) of each response, summed over its tokens. (B,)"""
        passes = self._forward_passes(rollout)
        return (passes.logprobs - passes.ref_logprobs).sum(-1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.validation_batch(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.validation_end(self)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.test_batch(self, batch)

    def on_test_epoch_end(self) -> None:
        self.evaluator.test_end(self)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self.evaluator.predict_batch(self, batch)
