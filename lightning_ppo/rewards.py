"""Reward models: text in, one scalar score per text out."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_ppo.loading import ConfigError, load_from_source


class ClassifierReward(nn.Module):
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
    def forward(self, texts: list[str]) -> Tensor:
        """Scores (B,) float32 for B texts, in micro-batches of `batch_size` (all at once if None)."""
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
