"""The PPO LightningModule: one training step is one PPO iteration (rollout, score, update)."""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ppo.callbacks import JsonlPredictionWriter
from lightning_ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    compute_rewards,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    policy_loss,
    value_loss,
)
from lightning_ppo.critic import build_critic
from lightning_ppo.data import first_of_each_index, unique_rows
from lightning_ppo.errors import check_number
from lightning_ppo.export import ExportOnFitEnd
from lightning_ppo.fault_tolerance import FaultTolerance
from lightning_ppo.faults import FaultGuard
from lightning_ppo.loading import ConfigError, check_fits_context
from lightning_ppo.lora import LoraOptions, adapter_disabled, apply_lora
from lightning_ppo.models import (
    PolicyWithValueHead,
    disable_dropout_in_model,
    eval_mode,
    load_causal_lm,
    load_tokenizer,
    make_reference,
    response_logits,
)
from lightning_ppo.parallel import (
    clips_in_engine,
    configure_deepspeed,
    gather_rows,
    gathered_for_generation,
    no_backward_sync,
)
from lightning_ppo.rewards import ClassifierReward, RewardModel
from lightning_ppo.rollout import (
    Rollout,
    SamplingConfig,
    draw_response_lengths,
    rollout_from_token_lists,
    sample_responses,
)
from lightning_ppo.shaping import RunningMoments, ShapingConfig, shape_scores


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Defaults are TRL 0.11's legacy `PPOConfig`, as the notebook used.

    Args:
        ppo_epochs: Optimisation passes over each rollout batch.
        mini_batch_size: Rows per forward/backward pass in the PPO epochs (TRL's minibatch).
        gradient_accumulation_steps: Minibatches whose gradients add up to one optimizer step, as in TRL:
            a step sees mini_batch_size x gradient_accumulation_steps rows, which must divide data.batch_size.
        cliprange: PPO ratio clip epsilon.
        cliprange_value: Value clip epsilon around the rollout's values.
        vf_coef: Weight of the value loss in the total loss.
        gamma: Discount factor for GAE.
        lam: GAE lambda.
        whiten_rewards: Whiten per-token rewards (without shifting the mean) before GAE, as TRL: its GAE
            then also reads the whitened padding after each response.
        whiten_rewards_masked: With whiten_rewards, zero the whitened rewards on padding again, so that
            padding (whose length depends on the other rows) never feeds a response's advantages.
        ratio_threshold: A micro-batch whose mean ratio exceeds this contributes no gradient (TRL's guard).
        max_grad_norm: Clip the gradient norm to this before each optimizer step; null disables it.
        kl_penalty: Per-token KL estimator in the reward: kl, abs, mse, full (whole vocabulary) or k3.
        adap_kl_ctrl: Adapt the KL coefficient towards `target` (Ziegler et al. 2019); false keeps it fixed.
        init_kl_coef: Initial (or fixed) KL coefficient.
        target: Target KL per sequence for the adaptive controller.
        horizon: Horizon of the adaptive controller, in samples.
        early_stopping: Skip a step's remaining PPO epochs once the policy KL of an epoch's last minibatch
            (mean over ranks) exceeds 1.5 x target_kl, as TRL.
        target_kl: The KL that early_stopping guards.
    """

    ppo_epochs: int = 4
    mini_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_rewards_masked: bool = False
    ratio_threshold: float = 10.0
    max_grad_norm: float | None = None
    kl_penalty: Literal["kl", "abs", "mse", "full", "k3"] = "kl"
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    target: float = 6.0
    horizon: int = 10000
    early_stopping: bool = False
    target_kl: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "mini_batch_size", "gradient_accumulation_steps", "horizon"):
            check_number(f"model.ppo.{name}", getattr(self, name), 1, integer=True)
        for name in ("cliprange", "cliprange_value", "ratio_threshold", "target", "target_kl"):
            check_number(f"model.ppo.{name}", getattr(self, name), 0, open_low=True)
        for name in ("vf_coef", "init_kl_coef"):
            check_number(f"model.ppo.{name}", getattr(self, name), 0)
        for name in ("gamma", "lam"):
            check_number(f"model.ppo.{name}", getattr(self, name), 0, 1)
        check_number("model.ppo.max_grad_norm", self.max_grad_norm, 0, open_low=True, optional=True)

    @property
    def backward_batch_size(self) -> int:
        """Rows per optimizer step (TRL's name)."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def check_batch_size(self, batch_size: int, key: str = "data.batch_size") -> None:
        """TRL's batch arithmetic: every optimizer step sees mini_batch_size x GA rows."""
        if batch_size % self.backward_batch_size:
            raise ConfigError(
                f"{key} ({batch_size}) must be divisible by model.ppo.mini_batch_size x "
                f"model.ppo.gradient_accumulation_steps ({self.mini_batch_size} x "
                f"{self.gradient_accumulation_steps} = {self.backward_batch_size}): one optimizer step sees "
                "that many rows; change one of these keys"
            )


@dataclass
class Experience:
    """A rollout with everything the PPO epochs need. Row-indexable for minibatches."""

    input_ids: Tensor  # (B, P + R) left-padded prompt then right-padded response
    attention_mask: Tensor  # (B, P + R)
    response_start: int  # P
    response_mask: Tensor  # (B, R) float32, 1 on response tokens that count
    old_logprobs: Tensor  # (B, R) float32 log pi_old(a_t | s_t)
    old_values: Tensor  # (B, R) float32 V_old(s_t)
    advantages: Tensor  # (B, R) float32, whitened
    returns: Tensor  # (B, R) float32
    prompt_pad: Tensor  # (B,) long, on CPU: left padding of each prompt
    response_len: Tensor  # (B,) long, on CPU: real response tokens of each row

    def select(self, rows: Tensor) -> Experience:
        """The given rows, padded only to the longest prompt and response among them."""
        left = int(self.prompt_pad[rows].min())
        right = int(self.response_len[rows].max())
        on_device = rows.to(self.input_ids.device)
        end = self.response_start + right
        per_token = {
            f.name: getattr(self, f.name)[on_device, :right]
            for f in fields(self)
            if f.name in ("response_mask", "old_logprobs", "old_values", "advantages", "returns")
        }
        return Experience(
            input_ids=self.input_ids[on_device, left:end],
            attention_mask=self.attention_mask[on_device, left:end],
            response_start=self.response_start - left,
            prompt_pad=self.prompt_pad[rows] - left,
            response_len=self.response_len[rows],
            **per_token,
        )

    @property
    def response_ids(self) -> Tensor:  # (B, R)
        return self.input_ids[:, self.response_start :]


class PPOModule(LightningModule):
    """PPO fine-tuning of a causal LM against a reward model, with a frozen reference for the KL penalty.

    Args:
        policy: Causal LM to tune: hub id, local folder, or `tiny:policy` (built offline).
        reward_model: Sequence classifier giving the reward: hub id, local folder, or `tiny:reward`.
        reward_label: Label whose raw logit is the score (the notebook: POSITIVE).
        reward_batch_size: Texts per reward-model forward pass; null scores the whole batch at once.
        learning_rate: Adam learning rate (TRL: 1.41e-5).
        ppo: PPO hyper-parameters.
        sampling: How responses are sampled.
        forward_batch_size: Rows per no-grad forward (old log-probs, values, reference); null = the whole
            batch. The training micro-batch is `ppo.mini_batch_size` rows.
        gradient_checkpointing: Recompute the policy's activations in the backward pass: less memory,
            about a third more compute.
        disable_dropout: Turn dropout off in every model, so the first PPO ratio is exactly 1.
        log_samples_every_n_steps: Every N PPO steps, write a table of sample texts with their rewards to
            TensorBoard; 0 disables it.
        num_log_samples: Rows in that table.
        max_consecutive_bad_steps: Stop the run, with a checkpoint, after this many PPO batches or optimizer
            steps in a row were skipped for NaN/inf values (see `lightning_ppo.faults`).
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
        self.shaping = shaping or ShapingConfig()
        self.save_hyperparameters(ignore=["reward"])  # a module: its config is in the CLI's config.yaml
        self.automatic_optimization = False

        self.tokenizer = load_tokenizer(policy)
        lm = load_causal_lm(policy)
        if disable_dropout:
            disable_dropout_in_model(lm)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference = None if lora else make_reference(lm)  # with LoRA: the policy with its adapter disabled
        self.policy = PolicyWithValueHead(apply_lora(lm, lora) if lora else lm, value_head=critic is None)
        self.critic = build_critic(critic, reward_model, self.tokenizer) if critic else None
        if self.critic is not None and disable_dropout:
            disable_dropout_in_model(self.critic)
        reward = reward or ClassifierReward(reward_model, reward_label, reward_batch_size)
        # The frozen models live in a plain dict, not as registered children: DDP and DeepSpeed wrap the
        # whole LightningModule and would otherwise cast, shard (ZeRO-3) and checkpoint them too.
        self._frozen: dict[str, torch.nn.Module] = {"reward": reward.requires_grad_(False).eval()}
        if reference is not None:
            self._frozen["ref_policy"] = reference
        self.score_moments = RunningMoments()
        if self.ppo.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(self.ppo.init_kl_coef, self.ppo.target, self.ppo.horizon)
        else:
            self.kl_ctl = FixedKLController(self.ppo.init_kl_coef)
        self.faults = FaultGuard(max_consecutive_bad_steps)
        self._test_rows: list[dict[str, Any]] = []
        self._eval_stats: dict[str, list[Tensor]] = defaultdict(list)

    @property
    def ref_policy(self) -> torch.nn.Module | None:
        """The frozen reference; None with LoRA, whose policy with the adapter disabled is the reference."""
        return self._frozen.get("ref_policy")

    @property
    def reward(self) -> RewardModel:
        return self._frozen["reward"]

    # ----------------------------------------------------------------------------------------------
    # Lightning plumbing

    def configure_callbacks(self) -> list[Callback]:
        return [JsonlPredictionWriter(), FaultTolerance(), ExportOnFitEnd()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam (DeepSpeed takes one optimizer): the policy's trainable weights, then the critic's."""
        lr = self.hparams.learning_rate
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": lr}]
        if self.critic is not None:
            critic_lr = self.hparams.critic_learning_rate or lr
            groups.append({"params": list(self.critic.parameters()), "lr": critic_lr})
        return torch.optim.Adam(groups, lr=lr)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if stage == "fit" and batch_size is not None:
            self.ppo.check_batch_size(batch_size)
        prompt_key = "data.max_prompt_tokens" if stage == "predict" else "data.prompt_max_tokens"
        prompt_tokens = getattr(datamodule, prompt_key.removeprefix("data."), None)
        if prompt_tokens is not None:
            response_tokens = self.sampling.response_max_length
            check_fits_context(
                self.policy.lm.config, prompt_tokens, prompt_key, response_tokens, self.hparams.policy
            )
        # TRL's micro-batch is a whole minibatch: gradient accumulation stacks minibatches
        configure_deepspeed(self.trainer.strategy, self.ppo.max_grad_norm, self.ppo.mini_batch_size)
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

    def on_validation_start(self) -> None:
        self._place_frozen_models()

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
        # frozen weights (a LoRA policy's base) are rebuilt from their source on load: keep them out
        state = checkpoint["state_dict"]
        for key in self._frozen_state_keys() & state.keys():
            del state[key]
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["score_moments"] = self.score_moments.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_state_keys()
        if "state_dict" in checkpoint:  # a DeepSpeed client state has none: the engine restores the weights
            checkpoint["state_dict"].update({k: v for k, v in self.state_dict().items() if k in frozen})
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        if "score_moments" in checkpoint:
            self.score_moments.load_state_dict(checkpoint["score_moments"])

    def _frozen_state_keys(self) -> set[str]:
        """Frozen weights of the registered models: a LoRA policy's base (tied names included).

        The reference and the reward model are not registered, so they are never in the state dict.
        """
        frozen = {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return frozen & self.state_dict().keys()

    # ----------------------------------------------------------------------------------------------
    # One PPO iteration

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        timings: dict[str, float] = {}
        with self._timed(timings, "time/rollout"):  # 1. sample responses for the batch of prompts
            lengths = draw_response_lengths(len(batch["query"]), self.sampling, self.device)
            rollout = self._sample(self.policy.lm, batch, lengths)
        with self._timed(timings, "time/reward"):  # 2. score prompt + response
            raw_scores, responses = self._score(rollout)
        metrics = self._step(rollout, raw_scores, timings)  # 3.-7. one PPO iteration
        self._log_metrics(metrics)  # 8. log (reduced across ranks)
        self._log_samples(batch["query"], responses, raw_scores)
        self.faults.stop_if_failing(self.trainer)

    def step(
        self, queries: list[Tensor], responses: list[Tensor], scores: list[Tensor] | Tensor
    ) -> dict[str, float]:
        """One PPO iteration on your own samples and rewards: the contract of TRL's `PPOTrainer.step`.

        `queries` and `responses` are lists of 1-D token-id tensors (every response token counts), `scores`
        one score per row. Runs the old-policy and reference passes, rewards, GAE, the PPO epochs and the
        KL-controller update; returns the statistics under TRL's names, averaged over ranks. Call it from
        a `training_step` (the module optimises manually).
        """
        if not len(queries) == len(responses) == len(scores):
            raise ValueError(
                f"step needs as many queries, responses and scores, got {len(queries)}, {len(responses)} "
                f"and {len(scores)}"
            )
        self.ppo.check_batch_size(len(queries), key="the number of rows given to PPOModule.step")
        rollout = rollout_from_token_lists(queries, responses, self.tokenizer.pad_token_id, self.device)
        scores = torch.stack([torch.as_tensor(score, dtype=torch.float32).reshape(()) for score in scores])
        metrics = self._step(rollout, scores.to(self.device), {})
        self.faults.stop_if_failing(self.trainer)
        names = list(metrics)
        means = self.trainer.strategy.reduce(torch.stack([metrics[n].float().to(self.device) for n in names]))
        return dict(zip(names, means.tolist(), strict=True))

    def _step(self, rollout: Rollout, raw_scores: Tensor, timings: dict[str, float]) -> dict[str, Tensor]:
        """Steps 3-7 of a PPO iteration on a scored rollout; returns this rank's statistics."""
        with self._timed(timings, "time/forward"):  # 3. old log-probs and values, reference log-probs
            old_logprobs, old_values, ref_logprobs, full = self._old_logprobs_values_ref(rollout)
        usable, fault_metrics = self.faults.check_rollout(
            self.trainer.strategy, raw_scores, old_logprobs, old_values, ref_logprobs
        )
        if not usable:  # NaN/inf rewards, log-probs or values: skip the batch (lightning_ppo.faults)
            return fault_metrics
        kl_coef = self.kl_ctl.value
        mask = rollout.response_mask
        # 4. per-token rewards: -kl_coef * KL, plus the shaped score on each response's last token
        scores = self._shape_scores(raw_scores, rollout)  # after the NaN check: it updates running moments
        kl_inputs = full if full is not None else (old_logprobs, ref_logprobs)
        rewards, non_score_rewards, kls = compute_rewards(
            scores, *kl_inputs, mask, kl_coef, self.ppo.kl_penalty
        )
        experience = self._make_experience(rollout, old_logprobs, old_values, rewards)  # 5. GAE, whitening
        with self._timed(timings, "time/optimize"):  # 6. PPO epochs over shuffled minibatches
            train_stats = self._ppo_epochs(experience)

        # TRL's objective/kl: per-sequence sums of the chosen estimator (the kls compute_rewards returns)
        mean_kl = self.trainer.strategy.reduce(kls.sum(-1).mean(), reduce_op="mean")
        world_batch = mask.shape[0] * self.trainer.world_size
        self.kl_ctl.update(float(mean_kl), world_batch)  # 7. adapt the KL coefficient (same on every rank)

        all_scores = self._gather_flat(raw_scores)  # (world * B,)
        prompt_mask = rollout.attention_mask[:, : rollout.response_start]
        return {
            "env/reward_mean": all_scores.mean(),
            "env/reward_std": all_scores.std(),
            "objective/kl": mean_kl,
            "objective/kl_coef": torch.tensor(kl_coef),
            "objective/entropy": (-old_logprobs * mask).sum(-1).mean(),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": scores.std(),
            "ppo/mean_non_score_reward": masked_mean(non_score_rewards, mask),  # per token, as TRL
            "ppo/learning_rate": torch.tensor(float(self.optimizers().param_groups[0]["lr"])),
            "tokens/queries_len_mean": prompt_mask.sum(-1).float().mean(),
            "tokens/responses_len_mean": mask.sum(-1).mean(),
            **train_stats,
            **fault_metrics,
            **{name: torch.tensor(seconds) for name, seconds in timings.items()},
        }

    def _log_metrics(self, metrics: dict[str, Tensor]) -> None:
        already_global = {"env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef"}
        batch_size = self.trainer.datamodule.batch_size if self.trainer.datamodule else None
        shown = {"env/reward_mean", "objective/kl"}
        for name, value in metrics.items():
            self.log(
                name,
                value.detach().float(),
                on_step=True,
                on_epoch=False,
                prog_bar=name in shown,
                sync_dist=name not in already_global,
                batch_size=batch_size,
            )

    def _old_logprobs_values_ref(
        self, rollout: Rollout
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """No-grad passes over the rollout, in micro-batches of `forward_batch_size` rows.

        One forward of the policy gives log-probs and values together, one of the reference its log-probs;
        all (B, R), masked. With `kl_penalty: full`, also both full log-distributions (B, R, V).
        """
        chunk = self.hparams.forward_batch_size or rollout.input_ids.shape[0]
        with torch.no_grad(), eval_mode(self):  # the policy and any critic
            parts = [self._no_grad_forward(part) for part in rollout.split(chunk)]
        logprobs, values, ref_logprobs = (
            torch.cat(column) for column in zip(*(p[:3] for p in parts), strict=True)
        )
        full = None
        if self.ppo.kl_penalty == "full":  # KL over the whole vocabulary needs both distributions
            full = (torch.cat([p[3] for p in parts]), torch.cat([p[4] for p in parts]))
        return logprobs, values, ref_logprobs, full

    def _no_grad_forward(self, rollout: Rollout) -> tuple[Tensor, ...]:
        logits, values = self._forward(rollout.input_ids, rollout.attention_mask, rollout.response_start)
        with self._reference() as reference:  # never around the policy's pass: it may disable LoRA
            ref_logits, _ = response_logits(
                reference,
                rollout.input_ids,
                rollout.attention_mask,
                rollout.response_start,
                self.policy.float32_head,
            )
        logits, ref_logits = self._tempered(logits), self._tempered(ref_logits)
        mask = rollout.response_mask
        outputs = (
            logprobs_from_logits(logits, rollout.response_ids) * mask,
            values * mask,
            logprobs_from_logits(ref_logits, rollout.response_ids) * mask,
        )
        if self.ppo.kl_penalty == "full":
            outputs += (torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1))
        return outputs

    def _make_experience(
        self, rollout: Rollout, logprobs: Tensor, values: Tensor, rewards: Tensor
    ) -> Experience:
        mask = rollout.response_mask
        advantages, returns = compute_advantages(
            values,
            rewards,
            mask,
            self.ppo.gamma,
            self.ppo.lam,
            self.ppo.whiten_rewards,
            self.ppo.whiten_rewards_masked,
        )
        prompt_mask = rollout.attention_mask[:, : rollout.response_start]
        return Experience(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            response_start=rollout.response_start,
            response_mask=mask,
            old_logprobs=logprobs,
            old_values=values,
            advantages=advantages.detach(),
            returns=returns.detach(),
            prompt_pad=(rollout.response_start - prompt_mask.sum(-1)).cpu(),
            response_len=mask.sum(-1).long().cpu(),
        )

    def _ppo_epochs(self, experience: Experience) -> dict[str, Tensor]:
        """`ppo_epochs` passes over shuffled backward batches, one optimizer step each; mean statistics.

        As TRL 0.11: a backward batch is `gradient_accumulation_steps` minibatches of `mini_batch_size`
        rows, each loss divided by the step count (accelerate's `backward` under `accumulate`). Statistics
        are per minibatch, averaged over the minibatches of every epoch that ran.
        """
        optimizer = self.optimizers()
        accumulation = self.ppo.gradient_accumulation_steps
        batch_size = experience.input_ids.shape[0]
        stats: dict[str, list[Tensor]] = defaultdict(list)
        epochs = 0
        while epochs < self.ppo.ppo_epochs:
            epochs += 1
            for backward_rows in torch.randperm(batch_size).split(self.ppo.backward_batch_size):
                step_loss = torch.zeros((), device=self.device)
                minibatches = backward_rows.split(self.ppo.mini_batch_size)
                for i, rows in enumerate(minibatches):
                    # DDP all-reduces the gradients once per optimizer step, on its last minibatch
                    with no_backward_sync(self.trainer.strategy, last_micro_batch=i == len(minibatches) - 1):
                        loss, minibatch_stats = self._ppo_loss(experience.select(rows))
                        self.manual_backward(loss / accumulation)
                    step_loss += loss.detach()
                    for name, value in minibatch_stats.items():
                        stats[name].append(value)
                if self.faults.step_is_finite(self.trainer.strategy, step_loss):  # else skip the step
                    if self.ppo.max_grad_norm is not None and not clips_in_engine(self.trainer.strategy):
                        self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad()
            if self.ppo.early_stopping and self._kl_too_high(stats["ppo/policy/policykl"][-1]):
                break
        means = {name: torch.stack(values).float().mean() for name, values in stats.items()}
        # TRL's definition, from the minibatch means
        means["ppo/val/var_explained"] = 1 - means["ppo/val/error"] / means["ppo/returns/var"]
        means["ppo/skipped_minibatches"] = torch.stack(stats["ppo/skipped_minibatches"]).float().sum()
        means["ppo/skipped_optimizer_steps"] = self.faults.pop_skipped_optimizer_steps()
        means["ppo/epochs"] = torch.tensor(float(epochs))  # fewer than ppo_epochs after an early stop
        return means

    def _kl_too_high(self, policykl: Tensor) -> bool:
        """TRL's `_early_stop`: the last minibatch's policy KL, averaged over ranks, above 1.5 x target_kl."""
        policykl = self.trainer.strategy.reduce(policykl.detach().clone(), reduce_op="mean")
        return bool(policykl > 1.5 * self.ppo.target_kl)  # the same decision on every rank

    def _ppo_loss(self, batch: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss on one minibatch, with TRL's statistics."""
        mask = batch.response_mask
        logits, values = self._forward(batch.input_ids, batch.attention_mask, batch.response_start)
        logits = self._tempered(logits)
        logprobs = logprobs_from_logits(logits, batch.response_ids)
        pg_loss, pg_stats = policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, mask, self.ppo.cliprange
        )
        vf_loss, vf_stats = value_loss(
            values, batch.old_values, batch.returns, mask, self.ppo.cliprange_value
        )
        loss = pg_loss + self.ppo.vf_coef * vf_loss
        # TRL's guard: a minibatch whose mean ratio explodes contributes nothing (no host sync needed)
        ratio_ok = (pg_stats["ratio"] <= self.ppo.ratio_threshold).to(loss.dtype)
        tokens = mask.sum()
        bessel = tokens / (tokens - 1)  # TRL's unbiased masked_var, without its host sync
        stats = {
            "ppo/loss/policy": pg_loss.detach() * ratio_ok,  # TRL zeroes the losses of a skipped minibatch
            "ppo/loss/value": vf_loss.detach() * ratio_ok,
            "ppo/loss/total": loss.detach() * ratio_ok,
            "ppo/policy/entropy": masked_mean(entropy_from_logits(logits.detach()), mask),
            "ppo/policy/approxkl": pg_stats["approxkl"],
            "ppo/policy/policykl": pg_stats["policykl"],
            "ppo/policy/clipfrac": pg_stats["clipfrac"],
            "ppo/policy/advantages_mean": masked_mean(batch.advantages, mask),
            "ppo/policy/ratio": pg_stats["ratio"],
            "ppo/returns/mean": masked_mean(batch.returns, mask),
            "ppo/returns/var": masked_var(batch.returns, mask, unbiased=False) * bessel,
            "ppo/val/vpred": vf_stats["vpred"],
            "ppo/val/error": vf_stats["error"],
            "ppo/val/clipfrac": vf_stats["clipfrac"],
            "ppo/val/mean": masked_mean(batch.old_values, mask),
            "ppo/val/var": masked_var(batch.old_values, mask, unbiased=False) * bessel,
            "ppo/skipped_minibatches": 1 - ratio_ok,
        }
        return loss * ratio_ok, stats

    # ----------------------------------------------------------------------------------------------
    # Sampling and scoring, shared by training, validation, test and predict

    def _sample(self, model: torch.nn.Module, batch: dict[str, Any], lengths: Tensor) -> Rollout:
        strategy = self._trainer.strategy if self._trainer is not None and model is self.policy.lm else None
        with eval_mode(model), gathered_for_generation(strategy, self.policy) as synced_gpus:
            return sample_responses(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                lengths,
                self.sampling,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                synced_gpus=synced_gpus,
            )

    def _score(self, rollout: Rollout) -> tuple[Tensor, list[str]]:
        """Scores (B,) of prompt + response text, and the decoded responses."""
        full_texts = self._decode(rollout.input_ids, rollout.attention_mask)
        queries = self._decode(rollout.query_ids, rollout.attention_mask[:, : rollout.response_start])
        responses = self._decode(rollout.response_ids, rollout.response_mask)
        return self.reward(full_texts, queries, responses).to(self.device), responses

    def _decode(self, ids: Tensor, mask: Tensor) -> list[str]:
        rows = [row[keep] for row, keep in zip(ids, mask.bool(), strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _shape_scores(self, scores: Tensor, rollout: Rollout) -> Tensor:
        """Scores (B,) after `model.shaping`: missing-EOS penalty, running scaling, clipping."""
        is_eos = rollout.response_ids == self.tokenizer.eos_token_id  # (B, R)
        has_eos = (is_eos & rollout.response_mask.bool()).any(-1)  # (B,)
        # every rank updates the running moments with every rank's scores, so they stay equal
        return shape_scores(scores, has_eos, self.shaping, self.score_moments, self._gather_flat)

    def _gather_flat(self, x: Tensor) -> Tensor:
        """Every rank's values of `x`, flattened into one (world * N,) tensor."""
        return self.all_gather(x).reshape(-1)

    def _forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_start: int
    ) -> tuple[Tensor, Tensor]:
        """Response logits (B, R, V) and values (B, R): the policy's value head, or the separate critic."""
        logits, values = self.policy(input_ids, attention_mask, response_start)
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask, response_start)
        return logits, values

    @contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The frozen starting LM: the reference copy, or the LoRA policy with its adapter switched off."""
        if self.ref_policy is not None:
            yield self.ref_policy
        else:
            with adapter_disabled(self.policy.lm) as lm:
                yield lm

    def _tempered(self, logits: Tensor) -> Tensor:
        temperature = self.sampling.temperature
        return logits if temperature == 1.0 else logits / temperature

    def _sequence_kl(self, rollout: Rollout) -> Tensor:
        """Sampled KL(policy || reference) of each response, summed over its tokens. (B,)"""
        logprobs, _, ref_logprobs, _ = self._old_logprobs_values_ref(rollout)
        return (logprobs - ref_logprobs).sum(-1)

    # ----------------------------------------------------------------------------------------------
    # Evaluation: held-out reward and KL during fit; before/after comparison in `test`

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        lengths = draw_response_lengths(len(batch["query"]), self.sampling, self.device)
        rollout = self._sample(self.policy.lm, batch, lengths)
        scores, _ = self._score(rollout)
        self._eval_stats["index"].append(batch["index"])
        self._eval_stats["reward"].append(scores)
        self._eval_stats["kl"].append(self._sequence_kl(rollout))

    def on_validation_epoch_end(self) -> None:
        rewards, kl = self._gather_eval_stats("reward", "kl")
        self.log_dict(
            {
                "val/reward_mean": rewards.mean(),
                "val/reward_median": rewards.quantile(0.5),
                "val/kl": kl.mean(),
            },
            rank_zero_only=True,
        )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sample from the reference and from the tuned policy, same prompts and lengths; score both."""
        lengths = draw_response_lengths(len(batch["query"]), self.sampling, self.device)
        with self._reference() as reference:
            before = self._sample(reference, batch, lengths)
        after = self._sample(self.policy.lm, batch, lengths)
        ref_scores, ref_responses = self._score(before)
        scores, responses = self._score(after)
        kl = self._sequence_kl(after)
        self._eval_stats["index"].append(batch["index"])
        self._eval_stats["reward_ref"].append(ref_scores)
        self._eval_stats["reward"].append(scores)
        self._eval_stats["kl"].append(kl)
        for i, query in enumerate(batch["query"]):
            self._test_rows.append(
                {
                    "index": int(batch["index"][i]),
                    "query": query,
                    "response (before)": ref_responses[i],
                    "response (after)": responses[i],
                    "rewards (before)": float(ref_scores[i]),
                    "rewards (after)": float(scores[i]),
                }
            )

    def on_test_epoch_end(self) -> None:
        ref_rewards, rewards, kl = self._gather_eval_stats("reward_ref", "reward", "kl")
        summary = {
            "test/reward_ref_mean": ref_rewards.mean(),
            "test/reward_ref_median": ref_rewards.quantile(0.5),
            "test/reward_policy_mean": rewards.mean(),
            "test/reward_policy_median": rewards.quantile(0.5),
            "test/kl": kl.mean(),
        }
        self.log_dict(summary, rank_zero_only=True)
        rows = unique_rows(gather_rows(self._test_rows))
        self._test_rows = []
        path = Path(self.trainer.log_dir or ".") / "test_samples.csv"  # a collective: every rank asks
        if not self.trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        rank_zero_info(
            f"Reward of the reference -> tuned policy on {len(rows)} held-out prompts: "
            f"mean {summary['test/reward_ref_mean']:.3f} -> {summary['test/reward_policy_mean']:.3f}, "
            f"median {summary['test/reward_ref_median']:.3f} -> {summary['test/reward_policy_median']:.3f}. "
            f"Per-prompt table: {path}"
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Continue each prompt with the tuned policy for `response_max_length` tokens, and score it."""
        lengths = torch.full((len(batch["query"]),), self.sampling.response_max_length, device=self.device)
        rollout = self._sample(self.policy.lm, batch, lengths)
        scores, responses = self._score(rollout)
        return [
            {"index": int(index), "prompt": query, "response": response, "reward": float(score)}
            for index, query, response, score in zip(
                batch["index"], batch["query"], responses, scores, strict=True
            )
        ]

    def _gather_eval_stats(self, *names: str) -> list[Tensor]:
        """Each statistic over batches and ranks, one value per held-out prompt in prompt order; resets them.

        Ranks evaluate equal, padded shares (`EvalSampler`): a prompt seen twice counts once.
        """
        keep = first_of_each_index(self._gather_flat(torch.cat(self._eval_stats.pop("index"))))
        return [self._gather_flat(torch.cat(self._eval_stats.pop(name)))[keep].float() for name in names]

    # ----------------------------------------------------------------------------------------------
    # Monitoring helpers

    @contextmanager
    def _timed(self, timings: dict[str, float], name: str) -> Iterator[None]:
        """Wall time of a phase; synchronises CUDA so GPU work is charged to the right phase."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[name] = time.perf_counter() - start

    def _log_samples(self, queries: list[str], responses: list[str], scores: Tensor) -> None:
        every = self.hparams.log_samples_every_n_steps
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        if not every or step % every or not self.trainer.is_global_zero:
            return
        rows = [
            f"| {q!r} | {r!r} | {s:.3f} |"
            for q, r, s in zip(queries, responses, scores.tolist(), strict=True)
        ][: self.hparams.num_log_samples]
        table = "\n".join(["| query | response | reward |", "|---|---|---|", *rows])
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", table, global_step=step)
