"""PPO's hyper-parameters (`model.ppo.*`), checked when they are set: TRL 0.11's legacy defaults; and the
help text of the module's own `model.*` keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_ppo.core import KLPenalty
from lightning_ppo.errors import ConfigError, check_number

# `PPOModule.__init__`'s docstring: jsonargparse reads its Args for `fit --help` and docs/configuration.md.
MODULE_ARGS = """The `model.*` keys of `PPOModule`.

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


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Defaults are TRL 0.11's legacy `PPOConfig`, as the notebook used.

    Args:
        ppo_epochs: Optimisation passes over each rollout batch.
        mini_batch_size: Rows per forward/backward pass in the PPO epochs (TRL's minibatch).
        gradient_accumulation_steps: Minibatches whose gradients add up to one optimizer step, as in TRL:
            a step sees mini_batch_size x gradient_accumulation_steps rows, which must divide data.batch_size.
            More than 1 is refused under DeepSpeed ZeRO-3.
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
        packing: Run each forward without padding gaps: rows laid out prompt-then-response from column 0
            and grouped into length buckets (`lightning_ppo.packing`), the LM head only at the real
            response tokens. Same losses and statistics as one padded forward, within float32 rounding.
            False: one forward over the padded minibatch (about a third of its positions are
            padding at the notebook's lengths).
        length_buckets: With packing, the most forwards a minibatch (or a no-grad pass) is cut into, rows
            grouped by length to minimise padding; each forward has a fixed cost, so more is not always
            faster.
        max_tokens_per_microbatch: Token budget of each forward in the PPO epochs and the no-grad passes
            (veRL's dynamic batch size), so long responses fit in small memory: each minibatch is cut into
            micro-batches of at most this many positions (rows x the widest of them; rows shortest first,
            each micro-batch one forward, a row wider than the budget alone), their losses weighted by
            their share of the minibatch's response tokens, so the gradient, statistics and TRL's ratio
            guard are those of the uncut minibatch. Replaces length_buckets and forward_batch_size where
            set. A guard to decide before a minibatch's first backward (gradient_accumulation_steps > 1,
            DeepSpeed ZeRO-2) costs one more no-grad forward per cut minibatch. Refused under ZeRO-3.
            null: no cut.
        advantage_estimator: How advantages are computed. gae: GAE over a value function (the notebook's
            PPO). Critic-free (no value head, no critic, no value loss): grpo, the group-normalised
            sequence reward (needs model.sampling.num_samples_per_prompt >= 2); rloo, the sequence reward
            minus the mean of the other samples of its prompt (k >= 2); reinforce_pp, the return to go of
            the per-token rewards, whitened over the global batch (any k).
        grpo_scale_by_std: With grpo, divide by the group's standard deviation; false is Dr. GRPO.
        kl_in: Where the KL to the reference goes: reward (-kl_coef * kl per token, with the adaptive
            controller) or loss (GRPO's: kl_loss_coef x the masked mean of the k3 estimator in the loss; the
            reward then holds no KL and the KL controller is not used).
        kl_loss_coef: Weight of the k3 KL term in the loss when kl_in is loss.
        tis_cap: Truncated importance sampling: weight each token's policy-gradient loss by
            min(exp(trainer log-prob - engine log-prob), tis_cap), the trainer's old float32 log-probs
            against the generation engine's (veRL's tis_imp_ratio_cap, typically 2), to correct for the
            engine/trainer mismatch; null disables it. Only an engine that reports its log-probs
            (model.sampling.engine vllm) has a mismatch to correct: with loop and generate the weights are 1.
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
    kl_penalty: KLPenalty = "kl"
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    target: float = 6.0
    horizon: int = 10000
    early_stopping: bool = False
    target_kl: float = 1.0
    packing: bool = True
    length_buckets: int = 4
    max_tokens_per_microbatch: int | None = None
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    grpo_scale_by_std: bool = True
    kl_in: Literal["reward", "loss"] = "reward"
    kl_loss_coef: float = 0.04  # DeepSeekMath (arXiv:2402.03300, section 4.2): "The KL coefficient is 0.04"
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        positive = (
            "ppo_epochs",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "horizon",
            "length_buckets",
        )
        for name in positive:
            check_number(f"model.ppo.{name}", getattr(self, name), 1, integer=True)
        for name in ("cliprange", "cliprange_value", "ratio_threshold", "target", "target_kl"):
            check_number(f"model.ppo.{name}", getattr(self, name), 0, open_low=True)
        for name in ("vf_coef", "init_kl_coef", "kl_loss_coef"):
            check_number(f"model.ppo.{name}", getattr(self, name), 0)
        for name in ("gamma", "lam"):
            check_number(f"model.ppo.{name}", getattr(self, name), 0, 1)
        check_number("model.ppo.max_grad_norm", self.max_grad_norm, 0, open_low=True, optional=True)
        check_number(
            "model.ppo.max_tokens_per_microbatch",
            self.max_tokens_per_microbatch,
            1,
            integer=True,
            optional=True,
        )
        check_number("model.ppo.tis_cap", self.tis_cap, 0, open_low=True, optional=True)

    @property
    def critic_free(self) -> bool:
        """No value function: the advantages come from the rewards alone."""
        return self.advantage_estimator != "gae"

    def check_estimator(self, samples_per_prompt: int, critic: str | None) -> None:
        """Refuse the estimator settings that make no sense together."""
        if self.advantage_estimator in ("grpo", "rloo") and samples_per_prompt < 2:
            raise ConfigError(
                f"model.ppo.advantage_estimator={self.advantage_estimator!r} compares the samples of each "
                f"prompt with each other, but model.sampling.num_samples_per_prompt is {samples_per_prompt}: "
                "set it to 2 or more (e.g. 4), or use advantage_estimator reinforce_pp or gae"
            )
        if self.critic_free and critic is not None:
            raise ConfigError(
                f"model.critic={critic!r} is set, but model.ppo.advantage_estimator="
                f"{self.advantage_estimator!r} uses no value function: leave model.critic null, or use "
                "advantage_estimator gae to train the critic"
            )

    @property
    def backward_batch_size(self) -> int:
        """Rows per optimizer step (TRL's name)."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def check_batch_size(
        self, batch_size: int, key: str = "data.batch_size", samples_per_prompt: int = 1
    ) -> None:
        """TRL's batch arithmetic: every optimizer step sees mini_batch_size x GA of the rollout's rows.

        A batch of `batch_size` prompts rolls out `batch_size x samples_per_prompt` rows.
        """
        rows = batch_size * samples_per_prompt
        what = f"{key} ({batch_size})"
        if samples_per_prompt > 1:
            what = (
                f"{key} x model.sampling.num_samples_per_prompt ({batch_size} x {samples_per_prompt} = "
                f"{rows} rows)"
            )
        if rows % self.backward_batch_size:
            raise ConfigError(
                f"{what} must be divisible by model.ppo.mini_batch_size x "
                f"model.ppo.gradient_accumulation_steps ({self.mini_batch_size} x "
                f"{self.gradient_accumulation_steps} = {self.backward_batch_size}): one optimizer step sees "
                "that many rows; change one of these keys"
            )
