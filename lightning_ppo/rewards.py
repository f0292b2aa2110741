"""Reward models: text in, one scalar score per text out. Pluggable in YAML with `model.reward.class_path`."""

from __future__ import annotations

import importlib
import numbers
import reprlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
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
    return call_reward(reward, texts, queries, responses).to(rollout.input_ids.device), responses


def call_reward(reward: RewardModel, texts: list[str], queries: list[str], responses: list[str]) -> Tensor:
    """`reward(texts, queries, responses)` as scores (B,) float32, or a `ConfigError` naming the reward."""
    kind = type(reward)
    return as_scores(reward(texts, queries, responses), len(texts), f"{kind.__module__}.{kind.__qualname__}")


def as_scores(returned: Any, count: int, reward: str) -> Tensor:
    """What a reward returned for `count` texts as scores (count,) float32; else a `ConfigError` that names
    `reward`, what it returned and what it must return. NaN/inf scores pass: `nan_guard` skips their batch.
    """
    detail = ""
    if isinstance(returned, (Tensor, np.ndarray)):
        array = torch.as_tensor(returned) if _is_real_array(returned) else None
        if array is not None and tuple(array.shape) == (count,):
            return array.float()
        what = f"a {type(returned).__name__} of dtype {returned.dtype} and shape {tuple(returned.shape)}"
        if array is None and returned.size and returned.ndim:
            detail = f" (first element {_short(returned.flatten()[0].item())})"
    elif isinstance(returned, (str, bytes, dict)) or not isinstance(returned, Iterable):
        what = "None" if returned is None else f"a {type(returned).__name__}, {_short(returned)},"
    else:  # a list, tuple or other iterable of numbers
        elements = list(returned)
        bad = [(i, e) for i, e in enumerate(elements) if not _is_number(e)]
        if not bad and len(elements) == count:
            return torch.tensor([float(e) for e in elements], dtype=torch.float32)
        what = f"a {type(returned).__name__} of {len(elements)} element(s)"
        if bad:
            position, first = bad[0]
            detail = f" (element {position} is {type(first).__name__}: {_short(first)})"
    raise ConfigError(
        f"model.reward: the reward {reward} returned {what} for {count} texts{detail}; it must return one "
        f"finite float per text (a list of {count} floats or a float tensor of shape ({count},)). Fix the "
        "reward."
    )


def _is_real_array(array: Tensor | np.ndarray) -> bool:
    if isinstance(array, Tensor):
        return not array.dtype.is_complex
    return array.dtype.kind in "biuf"


def _is_number(value: Any) -> bool:
    if isinstance(value, (Tensor, np.ndarray)):  # a 0-d tensor or array, e.g. one score of a model
        return value.ndim == 0 and _is_real_array(value)
    return isinstance(value, numbers.Real)


def _short(value: Any) -> str:
    """A repr of `value` cut to about 40 characters."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 40
    short.maxlist = short.maxdict = 3
    return short.repr(value)


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
        function = self._function
        name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"
        return as_scores(function(texts, queries, responses), len(texts), f"function {name}")


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
        return torch.stack([w * call_reward(r, texts, queries, responses).cpu() for r, w in pairs]).sum(0)
