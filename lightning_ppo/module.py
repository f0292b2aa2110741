"""The PPO LightningModule: Lightning's hooks and the wiring of one PPO iteration per training step.

`training_step` reads as the iteration: sample (`generation`), score (`rewards`), the no-grad passes and
advantages (`experience`), the PPO epochs (`update`), the KL controller, and the log (`monitoring`).
Evaluation is in `evaluation`, the math in `core`; this file holds no formula.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_ppo.checkpointing import (
    SafeCheckpoints,
    check_checkpoint_version,
    load_training_state,
    save_training_state,
)
from lightning_ppo.compat import logging_step
from lightning_ppo.config import PPOConfig
from lightning_ppo.core import AdaptiveKLController, FixedKLController
from lightning_ppo.data import check_prompt_settings, repeat_prompts
from lightning_ppo.errors import check_number
from lightning_ppo.evaluation import Evaluator, JsonlPredictionWriter
from lightning_ppo.experience import (
    ForwardPasses,
    forward_passes,
    make_experience,
    per_token_rewards,
    rollout_statistics,
    sampling_mismatch,
)
from lightning_ppo.generation import GenerationEngine, build_engine
from lightning_ppo.lora import LoraOptions
from lightning_ppo.models import build_models, eval_mode
from lightning_ppo.monitoring import (
    IterationResult,
    PhaseTimer,
    StepClock,
    StepMetrics,
    rollout_counts,
    samples_table,
)
from lightning_ppo.nan_guard import BadNumberGuard
from lightning_ppo.packing import TokenBudget
from lightning_ppo.parallel import (
    clips_in_engine,
    configure_deepspeed,
    gathered_for_generation,
    no_backward_sync,
)
from lightning_ppo.report import log_training_histograms
from lightning_ppo.resume import check_resumed_settings
from lightning_ppo.rewards import ClassifierReward, RewardModel, SampleBatch, score_rollout
from lightning_ppo.rollout import (
    Rollout,
    SamplingConfig,
    VLLMOptions,
    draw_response_lengths,
    rollout_from_token_lists,
)
from lightning_ppo.shaping import RunningMoments, Scores, ShapingConfig, shape_scores
from lightning_ppo.update import UpdateContext, ppo_epochs

__all__ = ["PPOConfig", "PPOModule"]  # PPOConfig: checkpoints pickled before 0.2 name it here

# Checkpoints are loaded weights-only (`checkpointing.read_checkpoint`); older ones pickled these option
# classes in their hyper-parameters (PPOConfig also under this module's name), so allow them by name.
_OPTION_CLASSES = [PPOConfig, SamplingConfig, VLLMOptions, ShapingConfig, LoraOptions]
torch.serialization.add_safe_globals([*_OPTION_CLASSES, (PPOConfig, f"{__name__}.PPOConfig")])


class PPOModule(LightningModule):
    """PPO fine-tuning of a causal LM against a reward model, with a frozen reference for the KL penalty.

    Args:
        policy: Causal LM to tune: hub id, local folder, or `tiny:policy` (built offline).
        reward_model: Sequence classifier giving the reward: hub id, local folder, or `tiny:reward`.
        reward_label: Label whose raw logit is the score (the notebook: POSITIVE).
        reward_batch_size: Texts per reward-model forward pass; null scores the whole batch at once.
        learning_rate: Adam learning rate (TRL: 1.41e-5).
        ppo: PPO hyper-parameters, among them the advantage estimator (gae, or critic-free grpo, rloo,
            reinforce_pp: no value head, no critic) and where the KL goes (reward or loss).
        sampling: How responses are sampled; `num_samples_per_prompt` responses per training prompt.
        forward_batch_size: Rows per no-grad forward (old log-probs, values, reference); null = the whole
            batch. The training micro-batch is `ppo.mini_batch_size` rows.
        gradient_checkpointing: Recompute the policy's activations in the backward pass: less memory,
            about a third more compute.
        disable_dropout: Turn dropout off in every model, so the first PPO ratio is exactly 1.
        log_samples_every_n_steps: Every N PPO steps, write to TensorBoard a table of sample texts with their
            rewards and histograms of the per-sequence rewards and KL; 0 disables it.
        num_log_samples: Rows in that table.
        max_consecutive_bad_steps: Stop the run, with a checkpoint, after this many PPO batches or optimizer
            steps in a row were skipped for NaN/inf values (see `lightning_ppo.nan_guard`).
        reward: A pluggable reward (`class_path` + `init_args`, a `lightning_ppo.rewards.RewardModel`);
            null builds `ClassifierReward` from reward_model, reward_label and reward_batch_size.
        lora: Train a LoRA adapter instead of the whole policy; the reference is the policy with the
            adapter disabled, so no copy of the model is held. Null: full fine-tuning.
        critic: A separate value model (hub id, local folder, `tiny:` asset, or "reward_model" for
            reward_model's backbone) with a fresh head; null: the value head on the policy trunk.
            It must share the policy's tokenizer.
        critic_learning_rate: Adam learning rate of the separate critic; null: learning_rate.
        shaping: Score shaping (missing-EOS penalty, running scaling/normalisation, clipping); off by default.
        fp32_lm_head: Compute the LM head and the value head in float32 (MiniMax-M1, 2025: a bf16 head makes
            training probabilities drift from sampling ones); null: on when the trainer's precision is bf16.
    """

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
        # The frozen models live in a plain dict, not as registered children: DDP and DeepSpeed wrap the
        # whole LightningModule and would otherwise cast, shard (ZeRO-3) and checkpoint them too.
        self._frozen: dict[str, nn.Module] = {"reward": reward.requires_grad_(False).eval()}
        if self.models.reference is not None:
            self._frozen["ref_policy"] = self.models.reference
        self.score_moments = RunningMoments()
        if self.ppo.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(self.ppo.init_kl_coef, self.ppo.target, self.ppo.horizon)
        else:
            self.kl_ctl = FixedKLController(self.ppo.init_kl_coef)
        self.bad_numbers = BadNumberGuard(max_consecutive_bad_steps)
        self.evaluator = Evaluator()
        self._clock = StepClock()
        self._engine: GenerationEngine | None = None
        self._engine_kind: str | None = None

    @property
    def ref_policy(self) -> torch.nn.Module | None:
        """The frozen reference; None with LoRA, whose policy with the adapter disabled is the reference."""
        return self._frozen.get("ref_policy")

    @property
    def reward(self) -> RewardModel:
        return self._frozen["reward"]

    @property
    def update_context(self) -> UpdateContext:
        """How the PPO epochs reach the optimizer and the other ranks, through Lightning."""
        strategy = self.trainer.strategy
        return UpdateContext(
            backward=self.manual_backward,
            no_sync=lambda last: no_backward_sync(strategy, last_micro_batch=last),
            optimizer_step=self._optimizer_step,
            mean_over_ranks=lambda x: strategy.reduce(x, reduce_op="mean"),
            max_over_ranks=self._max_over_ranks,
            gradients=None if clips_in_engine(strategy) else self._local_gradients,
        )

    def _max_over_ranks(self, count: int) -> int:
        return int(self.trainer.strategy.reduce(torch.tensor(count, device=self.device), reduce_op="max"))

    def _local_gradients(self) -> list[Tensor]:
        groups = self.optimizers().param_groups
        return [p.grad for group in groups for p in group["params"] if p.grad is not None]

    # ----------------------------------------------------------------------------------------------
    # Lightning plumbing

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
        configure_deepspeed(
            self.trainer.strategy,
            self.ppo.max_grad_norm,
            self.ppo.mini_batch_size,
            self.ppo.max_tokens_per_microbatch,
            self.ppo.gradient_accumulation_steps,
        )
        fp32_head = self.hparams.fp32_lm_head
        if fp32_head is None:
            fp32_head = "bf16" in str(self.trainer.precision)
        self.policy.float32_head = fp32_head
        if self.critic is not None:
            self.critic.float32_head = fp32_head

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
            if self._engine is not None:
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
        """Put the frozen models on this rank's device, in the dtype the strategy gave the policy.

        The reference must compute exactly what the starting policy computed, so the KL starts at 0
        (DeepSpeed with bf16 casts the policy's weights; the reward model follows for memory).
        """
        dtype = next(self.policy.lm.parameters()).dtype
        for model in self._frozen.values():
            model.to(device=self.trainer.strategy.root_device, dtype=dtype)

    def train(self, mode: bool = True) -> PPOModule:
        """Frozen models stay in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        for model in self._frozen.values():
            model.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_training_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_version(checkpoint.get("lightning_ppo_version", 1))
        changes = check_resumed_settings(self, checkpoint)  # before the weights: a refusal, not a shape error
        load_training_state(self, checkpoint, changes)

    # ----------------------------------------------------------------------------------------------
    # One PPO iteration

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One PPO iteration on a batch of B prompts: B x k rows, k = `sampling.num_samples_per_prompt`."""
        timer = PhaseTimer(self.device)
        with timer("rollout"):  # 1. sample k responses per prompt (a group shares its length limit)
            batch = repeat_prompts(batch, self.sampling.num_samples_per_prompt)
            rollout = self.generate_rollout(
                self.policy.lm, batch, self._training_lengths(len(batch["query"]))
            )
        with timer("reward"):  # 2. score each prompt + response
            scores, samples = score_rollout(self.reward, self.tokenizer, rollout, batch)
        result = self._ppo_iteration(rollout, scores, timer)  # 3.-6. experience, PPO epochs, KL controller
        eos = self.tokenizer.eos_token_id
        result.metrics.add_local(rollout_counts(rollout, eos), self._clock.lap(timer))
        result.metrics.log(
            self, batch_size=self.trainer.datamodule.batch_size if self.trainer.datamodule else None
        )
        self._log_samples(samples, result)  # 7. every N steps: a table of samples, histograms
        self.bad_numbers.stop_if_failing(self.trainer)

    def step(
        self, queries: list[Tensor], responses: list[Tensor], scores: list[Tensor] | Tensor
    ) -> dict[str, float]:
        """One PPO iteration on your own samples and rewards: the contract of TRL's `PPOTrainer.step`.

        `queries` and `responses` are lists of 1-D token-id tensors (every response token counts), `scores`
        one score per row. Returns the statistics under TRL's names, averaged over ranks. Call it from a
        `training_step` (the module optimises manually). For grpo and rloo, rows [g*k, (g+1)*k) must be the
        k = `sampling.num_samples_per_prompt` samples of one prompt.
        """
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
        strategy = self.trainer.strategy
        with timer("forward"):  # 3. old log-probs and values, reference log-probs
            passes = self._forward_passes(rollout, full_kl=self.ppo.kl_penalty == "full")
        usable, fault_metrics = self.bad_numbers.check_rollout(
            strategy, raw_scores, passes.logprobs, passes.values, passes.ref_logprobs
        )
        if not usable:  # NaN/inf rewards, log-probs or values: skip the batch (lightning_ppo.nan_guard)
            return IterationResult(StepMetrics(local=fault_metrics))
        scores = Scores.gather(raw_scores, rollout.has_eos(self.tokenizer.eos_token_id), self._gather_flat)
        kl_coef = self.kl_ctl.value if self.ppo.kl_in == "reward" else 0.0  # "loss": the KL is in ppo_loss
        # 4. per-token rewards (-kl_coef * KL, plus the shaped score on each last token), then advantages
        shaped = shape_scores(
            scores.local, scores.has_eos, self.shaping, self.score_moments, scores.everyone()
        )
        rewards = per_token_rewards(shaped, passes, rollout.response_mask, kl_coef, self.ppo)
        experience = make_experience(
            rollout,
            passes,
            rewards.rewards,
            self.ppo,
            self.sampling.num_samples_per_prompt,
            lambda x: strategy.reduce(x, reduce_op="sum"),
        )
        with timer("optimize"):  # 5. PPO epochs over shuffled minibatches
            train_stats = ppo_epochs(self.models, experience, self.ppo, self.update_context)
        # 6. the KL controller, the same on every rank. TRL's objective/kl: per-sequence sums of the estimator
        sequence_kls = rewards.kls.sum(-1)  # (B,)
        mean_kl = strategy.reduce(sequence_kls.mean(), reduce_op="mean")
        if self.ppo.kl_in == "reward":
            self.kl_ctl.update(float(mean_kl), rollout.response_mask.shape[0] * self.trainer.world_size)
        lr = float(self.optimizers().param_groups[0]["lr"])
        stats = rollout_statistics(rollout, passes, rewards, shaped)
        mismatch, mismatch_max = sampling_mismatch(
            rollout, passes, lambda x: strategy.reduce(x, reduce_op="max")
        )
        metrics = StepMetrics(
            local={
                **stats,
                **mismatch,
                "ppo/learning_rate": torch.tensor(lr),
                "ppo/skipped_optimizer_steps": self.bad_numbers.pop_skipped_optimizer_steps(),
                **train_stats,
                **fault_metrics,
                **timer.metrics(),
            },
            shared={
                "env/reward_mean": scores.all.mean(),
                "env/reward_std": scores.all.std(),
                "objective/kl": mean_kl,
                "objective/kl_coef": torch.tensor(kl_coef),
                **mismatch_max,
            },
        )
        return IterationResult(metrics, scores, sequence_kls)

    def _training_lengths(self, rows: int) -> Tensor:
        """Each row's response length limit (drawn per prompt, shared by its k samples). (rows,) long."""
        k = self.sampling.num_samples_per_prompt
        return draw_response_lengths(rows // k, self.sampling, self.device).repeat_interleave(k)

    def _optimizer_step(self, step_loss: Tensor) -> None:
        """Step the optimizer unless the step's loss is NaN/inf on some rank; clip first if asked."""
        optimizer = self.optimizers()
        if self.bad_numbers.step_is_finite(self.trainer.strategy, step_loss):  # else skip the step
            if self.ppo.max_grad_norm is not None and not clips_in_engine(self.trainer.strategy):
                self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm)
            optimizer.step()
            if self._engine is not None:
                self._engine.weights_changed()
        optimizer.zero_grad()

    # ----------------------------------------------------------------------------------------------
    # Sampling and scoring, shared by training, validation, test and predict (one response per prompt
    # outside training)

    @property
    def engine(self) -> GenerationEngine:
        """This rank's generation engine (`model.sampling.engine`), built on first use."""
        if self._engine is None or self._engine_kind != self.sampling.engine:
            pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
            self._engine = build_engine(self.sampling, self.policy.lm, pad, eos)
            self._engine_kind = self.sampling.engine
        return self._engine

    def generate_rollout(self, model: nn.Module, batch: dict[str, Any], lengths: Tensor) -> Rollout:
        """`model`'s responses to the batch's prompts, row i at most `lengths[i]` tokens."""
        strategy = self._trainer.strategy if self._trainer is not None and model is self.policy.lm else None
        with eval_mode(model), gathered_for_generation(strategy, self.policy) as synced_gpus:
            return self.engine.sample(
                model, batch["input_ids"], batch["attention_mask"], lengths, self.sampling, synced_gpus
            )

    def _gather_flat(self, x: Tensor) -> Tensor:
        """Every rank's rows of `x` (N, ...), stacked into one (world * N, ...) tensor."""
        return self.all_gather(x).reshape(-1, *x.shape[1:])

    def _forward_passes(self, rollout: Rollout, full_kl: bool = False) -> ForwardPasses:
        buckets = self.ppo.length_buckets if self.ppo.packing else None
        budget = self.ppo.max_tokens_per_microbatch
        budget = None if budget is None else TokenBudget(budget, self._max_over_ranks)
        return forward_passes(self.models, rollout, self.hparams.forward_batch_size, full_kl, buckets, budget)

    def sequence_kl(self, rollout: Rollout) -> Tensor:
        """Sampled KL(policy || reference) of each response, summed over its tokens. (B,)"""
        passes = self._forward_passes(rollout)
        return (passes.logprobs - passes.ref_logprobs).sum(-1)

    # ----------------------------------------------------------------------------------------------
    # Evaluation (lightning_ppo.evaluation): held-out reward and KL; before/after comparison in `test`

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

    # ----------------------------------------------------------------------------------------------
    # Logging

    def _log_samples(self, samples: SampleBatch, result: IterationResult) -> None:
        """Every `log_samples_every_n_steps`: a table of samples, and histograms of every rank's
        per-sequence rewards and KL (the KL gathered on every rank: a collective)."""
        every, step = self.hparams.log_samples_every_n_steps, logging_step(self.trainer)
        if not every or step % every or result.scores is None:  # a skipped (NaN) batch has no KL
            return
        all_kls = self._gather_flat(result.sequence_kls)
        if not self.trainer.is_global_zero:
            return
        scores = result.scores.local
        table = samples_table(samples.prompts, samples.responses, scores, self.hparams.num_log_samples)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", table, global_step=step)
                log_training_histograms(logger.experiment, step, result.scores.all, all_kls)
