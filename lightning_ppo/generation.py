"""The generation engine: the seam between the trainer and whatever samples responses.

An engine takes left-padded prompts, one length limit per row and the sampling settings, and returns a
`Rollout`. The trainer tells it when the policy's weights changed, so an engine that holds its own copy of
the weights (vLLM) syncs them before it samples again.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from lightning_ppo.rollout import Rollout, SamplingConfig, sample_responses


class GenerationEngine(Protocol):
    """Samples responses to prompts; `model.sampling.engine` picks the implementation. A protocol, so an
    engine in an optional module (`vllm_engine`) need not import this one, which builds it."""

    def sample(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        lengths: Tensor,
        config: SamplingConfig,
        synced_gpus: bool = False,
    ) -> Rollout:
        """Responses of `model` to the prompts (B, P), row i stopping at EOS or `lengths[i]` tokens."""
        raise NotImplementedError

    def weights_changed(self) -> None:
        """The trained policy's weights changed (an optimizer step, a resume)."""


class HuggingFaceEngine(GenerationEngine):
    """The decoding loop or one `generate` call on the model itself (`rollout.sample_responses`)."""

    def __init__(self, pad_token_id: int, eos_token_id: int | None) -> None:
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    def sample(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        lengths: Tensor,
        config: SamplingConfig,
        synced_gpus: bool = False,
    ) -> Rollout:
        return sample_responses(
            model,
            input_ids,
            attention_mask,
            lengths,
            config,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            synced_gpus=synced_gpus,
        )


def build_engine(
    config: SamplingConfig, policy: nn.Module, pad_token_id: int, eos_token_id: int | None
) -> GenerationEngine:
    """The engine `config.engine` names, for `policy` (the trained LM)."""
    if config.engine == "vllm":
        from lightning_ppo.vllm_engine import VLLMEngine  # vLLM is an optional extra

        return VLLMEngine(policy, config.vllm, pad_token_id, eos_token_id)
    return HuggingFaceEngine(pad_token_id, eos_token_id)


class LazyEngine:
    """The engine `config.engine` names, built on first use (vLLM is slow to start) and again when the
    setting changed; an engine not built yet has no weights to sync."""

    def __init__(self, pad_token_id: int, eos_token_id: int | None) -> None:
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.engine: GenerationEngine | None = None
        self.kind: str | None = None

    def get(self, config: SamplingConfig, policy: nn.Module) -> GenerationEngine:
        if self.engine is None or self.kind != config.engine:
            self.engine = build_engine(config, policy, self.pad_token_id, self.eos_token_id)
            self.kind = config.engine
        return self.engine

    def weights_changed(self) -> None:
        if self.engine is not None:
            self.engine.weights_changed()
