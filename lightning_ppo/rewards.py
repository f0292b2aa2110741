"""Reward models: text in, one scalar score per text out. Pluggable in YAML with `model.reward.class_path`."""

from __future__ import annotations

import importlib
import inspect
import numbers
import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from lightning_ppo.errors import ConfigError
from lightning_ppo.loading import load_from_source
from lightning_ppo.rollout import Rollout, decode_rows


@dataclass
class SampleBatch:
    """What every reward reads of B samples, in training, validation, test and predict alike."""

    prompts: list[str]  # decoded prompt of each row, special tokens dropped
    responses: list[str]  # decoded response (up to and including EOS), special tokens dropped
    texts: list[str]  # decoded prompt + response
    prompt_ids: list[Tensor]  # (P_i,) the prompt's token ids, padding dropped
    response_ids: list[Tensor]  # (R_i,) the response's token ids that count
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the prompt rows' other columns
    prompt_messages: list[list[dict[str, str]] | None] | None = None  # chat prompts as messages

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        prompts: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
        prompt_messages: list[list[dict[str, str]] | None] | None = None,
    ) -> SampleBatch:
        """Samples known only as text (a direct call, a request to a reward server): no token ids."""
        return cls(prompts, responses, texts, [], [], dict(columns or {}), prompt_messages)

    @classmethod
    def from_rollout(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        rollout: Rollout,
        columns: dict[str, list[Any]] | None = None,
        prompt_messages: list[list[dict[str, str]] | None] | None = None,
    ) -> SampleBatch:
        prompt_mask = rollout.attention_mask[:, : rollout.response_start].bool()
        response_mask = rollout.response_mask.bool()
        return cls(
            prompts=decode_rows(tokenizer, rollout.query_ids, prompt_mask),
            responses=decode_rows(tokenizer, rollout.response_ids, response_mask),
            texts=decode_rows(tokenizer, rollout.input_ids, rollout.attention_mask),
            prompt_ids=[row[keep].cpu() for row, keep in zip(rollout.query_ids, prompt_mask, strict=True)],
            response_ids=[
                row[keep].cpu() for row, keep in zip(rollout.response_ids, response_mask, strict=True)
            ],
            columns=dict(columns or {}),
            prompt_messages=prompt_messages,
        )


class RewardModel(nn.Module):
    """Base class of rewards: scores (B,) float32 of a `SampleBatch`.

    Override `forward(texts, queries, responses, columns=None)`; a forward without `columns` keeps working.
    A reward that needs more of the samples (token ids, chat messages) overrides `score`.
    """

    def forward(
        self,
        texts: list[str],
        queries: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def score(self, samples: SampleBatch) -> Any:
        """The reward of each sample; by default `forward` of the decoded texts (and columns)."""
        args = (samples.texts, samples.prompts, samples.responses)
        if takes_columns(self.forward):
            return self(*args, columns=samples.columns)
        return self(*args)


def takes_columns(function: Callable) -> bool:
    """Whether `function` accepts `columns=` (a parameter of that name, or `**kwargs`)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "columns" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def score_rollout(
    reward: RewardModel, tokenizer: PreTrainedTokenizerBase, rollout: Rollout, batch: dict[str, Any]
) -> tuple[Tensor, SampleBatch]:
    """Scores (B,) float32 of a rollout of `batch`'s prompts, and the samples the reward read."""
    samples = SampleBatch.from_rollout(tokenizer, rollout, batch.get("columns"), batch.get("prompt_messages"))
    return call_reward(reward, samples).to(rollout.input_ids.device), samples


def call_reward(reward: RewardModel, samples: SampleBatch) -> Tensor:
    """`reward.score(samples)` as scores (B,) float32, or a `ConfigError` naming the reward."""
    kind = type(reward)
    return as_scores(reward.score(samples), len(samples), f"{kind.__module__}.{kind.__qualname__}")


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
    """The raw logit of one label of a sequence classifier (the notebook's sentiment pipeline), or the one
    logit of a reward model with a single output (`num_labels=1`: no label needed).

    The classifier has its own tokenizer: policy text is decoded and re-tokenised for it, so the policy and
    the reward model need not share a vocabulary. A tokenizer with a chat template reads chat prompts as the
    conversation in its own template, the response as the assistant's turn.
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
        if self.model.config.num_labels == 1:
            self.label_id = 0
        elif label in labels:
            self.label_id = labels[label]
        else:
            raise ConfigError(
                f"model.reward_label={label!r} is not a label of the reward model {source!r}; "
                f"it has {sorted(labels)}. Set model.reward_label to one of them."
            )
        self.batch_size = batch_size
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.model.requires_grad_(False).eval()

    def score(self, samples: SampleBatch) -> Tensor:
        messages = samples.prompt_messages
        if not self.tokenizer.chat_template or not messages or all(m is None for m in messages):
            return self(samples.texts)
        conversations = [
            text if prompt is None else self._render(prompt, response)
            for text, prompt, response in zip(samples.texts, messages, samples.responses, strict=True)
        ]
        return self._logits(conversations, add_special_tokens=False)  # the template holds them

    def _render(self, prompt: list[dict[str, str]], response: str) -> str:
        conversation = [*prompt, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    @torch.no_grad()
    def forward(
        self, texts: list[str], queries: list[str] | None = None, responses: list[str] | None = None
    ) -> Tensor:
        """Scores (B,) float32 of the B full texts; queries and responses are not read."""
        return self._logits(texts)

    @torch.no_grad()
    def _logits(self, texts: list[str], add_special_tokens: bool = True) -> Tensor:
        """The label's logit (B,) float32, in micro-batches of `batch_size` (all at once if None)."""
        device = next(self.model.parameters()).device
        chunk = self.batch_size or len(texts)
        scores = []
        for start in range(0, len(texts), chunk):
            encoded = self.tokenizer(
                texts[start : start + chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=add_special_tokens,
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
    """A Python function imported by dotted path: `f(texts, queries, responses) -> scores`, or with a
    `columns` parameter (or `**kwargs`), `f(texts, queries, responses, columns=...)`.

    The function returns one number per text (a list or a tensor).
    """

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function
        self._function = import_function(function)

    def forward(
        self,
        texts: list[str],
        queries: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
    ) -> Tensor:
        function = self._function
        name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"
        extra = {"columns": columns or {}} if takes_columns(function) else {}
        return as_scores(function(texts, queries, responses, **extra), len(texts), f"function {name}")


class WeightedSumReward(RewardModel):
    """`sum_i weights[i] * rewards[i]`: combine several rewards into one score."""

    def __init__(self, rewards: list[RewardModel], weights: list[float]) -> None:
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ConfigError(
                f"model.reward.init_args.rewards ({len(rewards)}) and model.reward.init_args.weights "
                f"({len(weights)}) must be non-empty lists of the same length"
            )
        self.rewards = nn.ModuleList(rewards)
        self.weights = list(weights)

    def score(self, samples: SampleBatch) -> Tensor:
        pairs = zip(self.rewards, self.weights, strict=True)
        return torch.stack([w * call_reward(r, samples).cpu() for r, w in pairs]).sum(0)

    def forward(
        self,
        texts: list[str],
        queries: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
    ) -> Tensor:
        return self.score(SampleBatch.from_texts(texts, queries, responses, columns))
