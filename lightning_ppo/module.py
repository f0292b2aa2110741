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
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_ppo.callbacks import JsonlPredictionWriter
from lightning_ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from lightning_ppo.export import ExportOnFitEnd
from lightning_ppo.fault_tolerance import FaultTolerance
from lightning_ppo.models import (
    PolicyWithValueHead,
    disable_dropout_in_model,
    load_causal_lm,
    load_tokenizer,
    make_reference,
    response_logits,
)
from lightning_ppo.rewards import ClassifierReward
from lightning_ppo.rollout import Rollout, SamplingConfig, draw_response_lengths, sample_responses


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Defaults are TRL 0.11's legacy `PPOConfig`, as the notebook used.

    Args:
        ppo_epochs: Optimisation passes over each rollout batch.
        mini_batch_size: Samples per optimizer step; must divide data.batch_size.
        gradient_accumulation_steps: Micro-batches each minibatch is split into; must divide mini_batch_size.
        cliprange: PPO ratio clip epsilon.
        cliprange_value: Value clip epsilon around the rollout's values.
        vf_coef: Weight of the value loss in the total loss.
        gamma: Discount factor for GAE.
        lam: GAE lambda.
        whiten_rewards: Whiten per-token rewards (without shifting the mean) before GAE.
        ratio_threshold: A micro-batch whose mean ratio exceeds this contributes no gradient (TRL's guard).
        max_grad_norm: Clip the gradient norm to this before each optimizer step; null disables it.
        kl_penalty: Per-token KL estimator in the reward: kl, abs, mse, full (whole vocabulary) or k3.
        adap_kl_ctrl: Adapt the KL coefficient towards `target` (Ziegler et al. 2019); false keeps it fixed.
        init_kl_coef: Initial (or fixed) KL coefficient.
        target: Target KL per sequence for the adaptive controller.
        horizon: Horizon of the adaptive controller, in samples.
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
    ratio_threshold: float = 10.0
    max_grad_norm: float | None = None
    kl_penalty: Literal["kl", "abs", "mse", "full", "k3"] = "kl"
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "mini_batch_size", "gradient_accumulation_steps", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"model.ppo.mini_batch_size ({self.mini_batch_size}) must be divisible by "
                f"model.ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps})"
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
        reward_batch_size: Texts per reward-model forward pass.
        learning_rate: Adam learning rate (TRL: 1.41e-5).
        ppo: PPO hyper-parameters.
        sampling: How responses are sampled.
        disable_dropout: Turn dropout off in every model, so the first PPO ratio is exactly 1.
        log_samples_every_n_steps: Every N PPO steps, write a table of sample texts with their rewards to
            TensorBoard; 0 disables it.
        num_log_samples: Rows in that table.
    """

    def __init__(
        self,
        policy: str = "lvwerra/gpt2-imdb",
        reward_model: str = "lvwerra/distilbert-imdb",
        reward_label: str = "POSITIVE",
        reward_batch_size: int = 64,
        learning_rate: float = 1.41e-5,
        ppo: PPOConfig | None = None,
        sampling: SamplingConfig | None = None,
        disable_dropout: bool = True,
        log_samples_every_n_steps: int = 10,
        num_log_samples: int = 8,
    ) -> None:
        super().__init__()
        self.ppo = ppo or PPOConfig()
        self.sampling = sampling or SamplingConfig()
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.tokenizer = load_tokenizer(policy)
        lm = load_causal_lm(policy)
        if disable_dropout:
            disable_dropout_in_model(lm)
        self.ref_policy = make_reference(lm)  # frozen copy of the starting policy
        self.policy = PolicyWithValueHead(lm)
        self.reward = ClassifierReward(reward_model, reward_label, reward_batch_size)
        if self.ppo.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(self.ppo.init_kl_coef, self.ppo.target, self.ppo.horizon)
        else:
            self.kl_ctl = FixedKLController(self.ppo.init_kl_coef)
        self._test_rows: list[dict[str, Any]] = []
        self._eval_stats: dict[str, list[Tensor]] = defaultdict(list)

    # ----------------------------------------------------------------------------------------------
    # Lightning plumbing

    def configure_callbacks(self) -> list[Callback]:
        return [JsonlPredictionWriter(), FaultTolerance(), ExportOnFitEnd()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.parameters(), lr=self.hparams.learning_rate)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if stage == "fit" and batch_size is not None and batch_size % self.ppo.mini_batch_size:
            raise ValueError(
                f"data.batch_size ({batch_size}) must be divisible by model.ppo.mini_batch_size "
                f"({self.ppo.mini_batch_size}); set model.ppo.mini_batch_size to a divisor of it"
            )

    def train(self, mode: bool = True) -> PPOModule:
        """Frozen models stay in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self.ref_policy.eval()
        self.reward.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # frozen models are rebuilt from their source on load: keep them out of the file
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self._frozen_prefixes)]:
            del state[key]
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith(self._frozen_prefixes)}
        checkpoint["state_dict"].update(frozen)
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])

    _frozen_prefixes = ("ref_policy.", "reward.")

    # ----------------------------------------------------------------------------------------------
    # One PPO iteration

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        timings: dict[str, float] = {}
        with self._timed(timings, "time/rollout"):  # 1. sample responses for the batch of prompts
            lengths = draw_response_lengths(len(batch["query"]), self.sampling, self.device)
            rollout = self._sample(self.policy.lm, batch, lengths)
        with self._timed(timings, "time/reward"):  # 2. score prompt + response
            scores, responses = self._score(rollout)
        with self._timed(timings, "time/forward"):  # 3. old log-probs and values, reference log-probs
            old_logprobs, old_values, ref_logprobs, full = self._old_logprobs_values_ref(rollout)
        kl_coef = self.kl_ctl.value
        mask = rollout.response_mask
        rewards, non_score_rewards, _ = (
            compute_rewards(  # 4. per-token rewards: -beta * KL, + score at the end
                scores, *(full if full else (old_logprobs, ref_logprobs)), mask, kl_coef, self.ppo.kl_penalty
            )
        )
        experience = self._make_experience(rollout, old_logprobs, old_values, rewards)  # 5. GAE, whitening
        with self._timed(timings, "time/optimize"):  # 6. PPO epochs over shuffled minibatches
            train_stats = self._ppo_epochs(experience)

        kl_per_sequence = ((old_logprobs - ref_logprobs) * mask).sum(-1)  # (B,)
        mean_kl = self.trainer.strategy.reduce(kl_per_sequence.mean(), reduce_op="mean")
        world_batch = len(batch["query"]) * self.trainer.world_size
        self.kl_ctl.update(float(mean_kl), world_batch)  # 7. adapt the KL coefficient (same on every rank)

        all_scores = self.all_gather(scores).reshape(-1)  # (world * B,)
        returns_var = masked_var(experience.returns, mask)
        metrics = {
            "env/reward_mean": all_scores.mean(),
            "env/reward_std": all_scores.std(),
            "objective/kl": mean_kl,
            "objective/kl_coef": torch.tensor(kl_coef),
            "objective/entropy": (-old_logprobs * mask).sum(-1).mean(),
            "ppo/mean_scores": scores.mean(),
            "ppo/mean_non_score_reward": (non_score_rewards * mask).sum(-1).mean(),
            "ppo/policy/advantages_mean": masked_mean(experience.advantages, mask),
            "ppo/returns/mean": masked_mean(experience.returns, mask),
            "ppo/returns/var": returns_var,
            "ppo/val/var_explained": 1 - train_stats["ppo/val/error"] / returns_var,  # TRL's definition
            "tokens/queries_len_mean": batch["attention_mask"].sum(-1).float().mean(),
            "tokens/responses_len_mean": mask.sum(-1).mean(),
            **train_stats,
            **{name: torch.tensor(seconds) for name, seconds in timings.items()},
        }
        self._log_metrics(metrics)  # 8. log (reduced across ranks)
        self._log_samples(batch["query"], responses, scores)

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
        """One no-grad forward of the policy (log-probs and values) and one of the reference."""
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            logits, values = self.policy(rollout.input_ids, rollout.attention_mask, rollout.response_start)
            ref_logits, _ = response_logits(
                self.ref_policy, rollout.input_ids, rollout.attention_mask, rollout.response_start
            )
            logits, ref_logits = self._tempered(logits), self._tempered(ref_logits)
            logprobs = logprobs_from_logits(logits, rollout.response_ids)
            ref_logprobs = logprobs_from_logits(ref_logits, rollout.response_ids)
            full = None
            if self.ppo.kl_penalty == "full":  # KL over the whole vocabulary needs both distributions
                full = (torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1))
        self.policy.train(was_training)
        mask = rollout.response_mask
        return logprobs * mask, values * mask, ref_logprobs * mask, full

    def _make_experience(
        self, rollout: Rollout, logprobs: Tensor, values: Tensor, rewards: Tensor
    ) -> Experience:
        mask = rollout.response_mask
        if self.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(values, rewards, mask, self.ppo.gamma, self.ppo.lam)
        advantages = masked_whiten(advantages, mask)
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
        """`ppo_epochs` passes of shuffled minibatches, one optimizer step each; returns mean statistics."""
        optimizer = self.optimizers()
        accumulation = self.ppo.gradient_accumulation_steps
        micro_batch_size = self.ppo.mini_batch_size // accumulation
        batch_size = experience.input_ids.shape[0]
        stats: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(self.ppo.ppo_epochs):
            for minibatch in torch.randperm(batch_size).split(self.ppo.mini_batch_size):
                for micro_rows in minibatch.split(micro_batch_size):
                    loss, micro_stats = self._ppo_loss(experience.select(micro_rows))
                    self.manual_backward(loss / accumulation)
                    for name, value in micro_stats.items():
                        stats[name].append(value)
                if self.ppo.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        means = {name: torch.stack(values).float().mean() for name, values in stats.items()}
        means["ppo/skipped_minibatches"] = torch.stack(stats["ppo/skipped_minibatches"]).float().sum()
        return means

    def _ppo_loss(self, batch: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss + vf_coef * clipped value loss on one micro-batch, with TRL's statistics."""
        mask = batch.response_mask
        logits, values = self.policy(batch.input_ids, batch.attention_mask, batch.response_start)
        logits = self._tempered(logits)
        logprobs = logprobs_from_logits(logits, batch.response_ids)
        pg_loss, pg_stats = policy_loss(
            logprobs, batch.old_logprobs, batch.advantages, mask, self.ppo.cliprange
        )
        vf_loss, vf_stats = value_loss(
            values, batch.old_values, batch.returns, mask, self.ppo.cliprange_value
        )
        loss = pg_loss + self.ppo.vf_coef * vf_loss
        # TRL's guard: a micro-batch whose mean ratio explodes contributes nothing (no host sync needed)
        ratio_ok = (pg_stats["ratio"] <= self.ppo.ratio_threshold).to(loss.dtype)
        stats = {
            "ppo/loss/policy": pg_loss.detach(),
            "ppo/loss/value": vf_loss.detach(),
            "ppo/loss/total": loss.detach(),
            "ppo/policy/entropy": masked_mean(entropy_from_logits(logits.detach()), mask),
            "ppo/policy/approxkl": pg_stats["approxkl"],
            "ppo/policy/policykl": pg_stats["policykl"],
            "ppo/policy/clipfrac": pg_stats["clipfrac"],
            "ppo/policy/ratio": pg_stats["ratio"],
            "ppo/val/vpred": vf_stats["vpred"],
            "ppo/val/error": vf_stats["error"],
            "ppo/val/clipfrac": vf_stats["clipfrac"],
            "ppo/skipped_minibatches": 1 - ratio_ok,
        }
        return loss * ratio_ok, stats

    # ----------------------------------------------------------------------------------------------
    # Sampling and scoring, shared by training, validation, test and predict

    def _sample(self, model: torch.nn.Module, batch: dict[str, Any], lengths: Tensor) -> Rollout:
        return sample_responses(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            lengths,
            self.sampling,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )

    def _score(self, rollout: Rollout) -> tuple[Tensor, list[str]]:
        """Scores (B,) of prompt + response text, and the decoded responses."""
        mask = rollout.attention_mask.bool()
        full_texts = self.tokenizer.batch_decode(
            [ids[keep] for ids, keep in zip(rollout.input_ids, mask, strict=True)], skip_special_tokens=True
        )
        response_mask = rollout.response_mask.bool()
        responses = self.tokenizer.batch_decode(
            [ids[keep] for ids, keep in zip(rollout.response_ids, response_mask, strict=True)],
            skip_special_tokens=True,
        )
        return self.reward(full_texts).to(self.device), responses

    def _tempered(self, logits: Tensor) -> Tensor:
        temperature = self.sampling.temperature
        return logits if temperature == 1.0 else logits / temperature

    def _sequence_kl(self, rollout: Rollout) -> Tensor:
        """Sampled KL(policy || reference) of each response, summed over its tokens. (B,)"""
        with torch.no_grad():
            logits, _ = self.policy(rollout.input_ids, rollout.attention_mask, rollout.response_start)
            ref_logits, _ = response_logits(
                self.ref_policy, rollout.input_ids, rollout.attention_mask, rollout.response_start
            )
        logprobs = logprobs_from_logits(self._tempered(logits), rollout.response_ids)
        ref_logprobs = logprobs_from_logits(self._tempered(ref_logits), rollout.response_ids)
        return ((logprobs - ref_logprobs) * rollout.response_mask).sum(-1)

    # ----------------------------------------------------------------------------------------------
    # Evaluation: held-out reward and KL during fit; before/after comparison in `test`

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        lengths = draw_response_lengths(len(batch["query"]), self.sampling, self.device)
        rollout = self._sample(self.policy.lm, batch, lengths)
        scores, _ = self._score(rollout)
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
        before = self._sample(self.ref_policy, batch, lengths)
        after = self._sample(self.policy.lm, batch, lengths)
        ref_scores, ref_responses = self._score(before)
        scores, responses = self._score(after)
        kl = self._sequence_kl(after)
        self._eval_stats["reward_ref"].append(ref_scores)
        self._eval_stats["reward"].append(scores)
        self._eval_stats["kl"].append(kl)
        for i, query in enumerate(batch["query"]):
            self._test_rows.append(
                {
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
        rows = self._gather_objects(self._test_rows)
        self._test_rows = []
        if not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.log_dir or ".") / "test_samples.csv"
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
            {"prompt": query, "response": response, "reward": float(score)}
            for query, response, score in zip(batch["query"], responses, scores, strict=True)
        ]

    def _gather_eval_stats(self, *names: str) -> list[Tensor]:
        """Concatenate the per-batch values of each statistic over batches and ranks, then reset them."""
        gathered = []
        for name in names:
            local = torch.cat(self._eval_stats.pop(name))
            gathered.append(self.all_gather(local).reshape(-1).float())
        return gathered

    def _gather_objects(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not (dist.is_available() and dist.is_initialized()):
            return rows
        per_rank: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(per_rank, rows)
        return [row for rank_rows in per_rank for row in rank_rows]

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
