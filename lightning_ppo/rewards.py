"""Reward models: text in, one scalar score per text out. Pluggable in YAML with `model.reward.class_path`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from lightning_ppo.errors import ConfigError
from lightning_ppo.loading import load_from_source
from lightning_ppo.rollout import Rollout, decode_rows


class RewardModel(nn.Module):
    """Base class of rewards: `reward(texts, queries, responses)` -> scores (B,) float32.

    `texts[i]` is `queries[i] + responses[i]` as decoded text. An nn.Module, so weights move to the device.
    """

    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> Tensor:
        raise NotImplementedError


def score_rollout(
    reward: RewardModel, tokenizer: PreTrainedTokenizerBase, rollout: Rollout
) -> tuple[Tensor, list[str]]:
    """Scores (B,) float32 of each prompt + response as text, and the decoded responses."""
    texts = decode_rows(tokenizer, rollout.input_ids, rollout.attention_mask)
    queries = decode_rows(tokenizer, rollout.query_ids, rollout.attention_mask[:, : rollout.response_start])
    responses = decode_rows(tokenizer, rollout.response_ids, rollout.response_mask)
    return reward(texts, queries, responses).to(rollout.input_ids.device), responses


class ClassifierReward(RewardModel):
    """The raw logit of one label of a sequence classifier, as the notebook's sentiment pipeline.

    The classifier has its own tokenizer: policy text is decoded and re-tokenised for it, so the policy
    and the reward model need not share a vocabulary.
    """

    def __init__(
        self, source: str, label: str = "POSITIVE", batch_size: int | None = None, max_length: int = 512
    ) -> None:
        super().__init__()
        self.source = source
        key = "model.reward_model"
        self.model = load_from_source(
            AutoModelForSequenceClassification.from_pretrained, source, key, "model"
        )
        self.tokenizer = load_from_source(AutoTokenizer.from_pretrained, source, key, "tokenizer")
        self.tokenizer.padding_side = "right"
        labels = self.model.config.label2id
        if label not in labels:
            raise ConfigError(
                f"model.reward_label={label!r} is not a label of the reward model {source!r}; "
                f"it has {sorted(labels)}. Set model.reward_label to one of them."
            )
        self.label_id = labels[label]
        self.batch_size = batch_size
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(
        self, texts: list[str], queries: list[str] | None = None, responses: list[str] | None = None
    ) -> Tensor:
        """Scores (B,) float32 of the B full texts, in micro-batches of `batch_size` (all at once if None).

        Queries and responses are accepted for the `RewardModel` interface; the classifier reads the texts.
        """
        device = next(self.model.parameters()).device
        chunk = self.batch_size or len(texts)
        scores = []
        for start in range(0, len(texts), chunk):
            encoded = self.tokenizer(
                texts[start : start + chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            scores.append(self.model(**encoded).logits[:, self.label_id].float())
        return torch.cat(scores)


def import_function(path: str) -> Callable:
    """The object at `package.module:name`."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ConfigError(f"a reward function must be given as 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), name)


class FunctionReward(RewardModel):
    """A Python function of the texts, imported by dotted path: `f(texts, queries, responses) -> scores`.

    The function returns one number per text (a list or a tensor).
    """

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function
        self._function = import_function(function)

    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> Tensor:
        scores = torch.as_tensor(self._function(texts, queries, responses), dtype=torch.float32)
        if scores.shape != (len(texts),):
            raise ValueError(
                f"reward function {self.function} returned shape {tuple(scores.shape)}; "
                f"it must return one score per text ({len(texts)})"
            )
        return scores


class WeightedSumReward(RewardModel):
    """`sum_i weights[i] * rewards[i](...)`: combine several rewards into one score."""

    def __init__(self, rewards: list[RewardModel], weights: list[float]) -> None:
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ConfigError(
                f"model.reward.init_args.rewards ({len(rewards)}) and model.reward.init_args.weights "
                f"({len(weights)}) must be non-empty lists of the same length"
            )
        self.rewards = nn.ModuleList(rewards)
        self.weights = list(weights)

    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> Tensor:
        pairs = zip(self.rewards, self.weights, strict=True)
        return torch.stack([w * r(texts, queries, responses).float().cpu() for r, w in pairs]).sum(0)
