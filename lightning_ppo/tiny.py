"""Offline stand-ins for the notebook's assets, so the demo and the tests never touch the hub.

`tiny:policy` (for `lvwerra/gpt2-imdb`), `tiny:reward` (for `lvwerra/distilbert-imdb`) and `tiny:reviews`
(for `imdb`) are built once, deterministically, into a cache folder that `resolve_source` names; so are
the arithmetic demo's `tiny:chat-policy` and `tiny:arithmetic` (`tiny_arithmetic`), in their own folder."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from filelock import FileLock
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from lightning_ppo.tiny_arithmetic import build_arithmetic_assets

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_NAMES = ("policy", "reward", "reviews")
ARITHMETIC_NAMES = ("chat-policy", "arithmetic")
# Bump whenever a recipe changes, so stale caches are never reused.
TINY_VERSION = "tiny-v1"
ARITHMETIC_VERSION = "tiny-arithmetic-v1"

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
REWARD_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

POSITIVE_WORDS = (
    "great", "wonderful", "loved", "brilliant", "excellent", "amazing", "superb", "beautiful", "enjoyed",
    "fantastic", "perfect", "charming", "delightful", "masterpiece", "best", "fun", "moving", "funny",
    "gorgeous", "stunning", "touching", "clever", "hilarious", "terrific", "outstanding", "marvelous",
    "love", "impressive", "powerful", "favorite",
)  # fmt: skip
NEGATIVE_WORDS = (
    "boring", "awful", "hated", "terrible", "bad", "worst", "horrible", "dull", "stupid", "waste",
    "poor", "disappointing", "mess", "ugly", "lame", "annoying", "pointless", "weak", "tedious",
    "ridiculous", "predictable", "bland", "painful", "disaster", "forgettable", "hate", "clumsy",
    "mediocre", "silly", "unwatchable",
)  # fmt: skip
NEUTRAL_WORDS = (
    "the", "a", "an", "movie", "film", "plot", "actor", "actress", "scene", "scenes", "was", "is", "and",
    "but", "or", "of", "to", "in", "on", "with", "for", "this", "that", "it", "its", "story", "director",
    "cast", "ending", "character", "characters", "music", "camera", "script", "dialogue", "i", "we", "they",
    "he", "she", "his", "her", "their", "my", "very", "quite", "really", "too", "so", "just", "also",
    "then", "when", "while", "after", "before", "about", "as", "at", "by", "from", "one", "two", "first",
    "last", "time", "minutes", "hour", "night", "saw", "watched", "seen", "thought", "felt", "seemed",
    "made", "makes", "role", "lead", "hero", "villain", "screen", "theater", "series", "episode", "sequel",
    "book", "version", "original", "audience", "effects", "budget", "studio", "year", "people", "life",
    "world", "house", "city", "family", "friend", "war",
)  # fmt: skip

NUM_TRAIN_REVIEWS = 2000
NUM_TEST_REVIEWS = 500
MAX_POSITIONS = 128  # context of both tiny models
SHORT_REVIEW_RATE = 0.05  # short reviews give the data module's `> 200 characters` filter work to do


def tiny_cache_dir() -> Path:
    """The cache root: `$LIGHTNING_PPO_CACHE` if set, else `~/.cache/lightning_ppo`."""
    cache = os.environ.get("LIGHTNING_PPO_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "lightning_ppo"


def tiny_seed() -> int:
    """The seed the assets are built with: `$LIGHTNING_PPO_TINY_SEED`, else 0 (the test suite varies it)."""
    value = os.environ.get("LIGHTNING_PPO_TINY_SEED", "0")
    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if seed < 0:
        raise ValueError(f"LIGHTNING_PPO_TINY_SEED must be a non-negative integer, got {value!r}")
    return seed


def tiny_assets_dir(version: str = TINY_VERSION) -> Path:
    """The folder of the assets of this version and seed (seed 0 keeps the plain version name)."""
    seed = tiny_seed()
    return tiny_cache_dir() / (version if seed == 0 else f"{version}-seed{seed}")


def resolve_source(source: str) -> str:
    """Map `tiny:<name>` to the absolute folder of that asset (building it if needed); pass others through."""
    if not source.startswith(TINY_PREFIX):
        return source
    name = source.removeprefix(TINY_PREFIX)
    if name in ARITHMETIC_NAMES:
        return str((ensure_arithmetic_assets() / name).absolute())
    if name not in TINY_NAMES:
        valid = ", ".join(TINY_PREFIX + n for n in (*TINY_NAMES, *ARITHMETIC_NAMES))
        raise ValueError(f"Unknown tiny asset {source!r}; valid names: {valid}")
    return str((ensure_tiny_assets() / name).absolute())


def ensure_tiny_assets() -> Path:
    """Build the tiny assets unless they exist; safe when several processes (DDP ranks) call it at once."""
    return ensure_built(tiny_assets_dir(), build_tiny_assets, "the tiny assets (once; takes about 10-20 s)")


def ensure_arithmetic_assets() -> Path:
    """Build the arithmetic demo's assets unless they exist, as `ensure_tiny_assets`."""
    return ensure_built(
        tiny_assets_dir(ARITHMETIC_VERSION),
        build_arithmetic_assets,
        "the arithmetic demo's assets (once; takes about 30-60 s)",
    )


def ensure_built(root: Path, build: Callable[[Path, int], None], what: str) -> Path:
    """`build(folder, seed)` into `root` unless it exists, under a file lock; renamed into place whole."""
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        if root.is_dir():  # another process built it while we waited for the lock
            return root
        # Build next to the final folder and rename atomically: a crash never leaves a half-built root.
        staging = root.with_name(f".{root.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)  # left by a build that was killed
        staging.mkdir()
        logger.info("Building %s into %s", what, root)
        try:
            build(staging, tiny_seed())
            os.rename(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return root


def build_tiny_assets(root: Path, seed: int = 0) -> None:
    """Write `reviews/`, `policy/` and `reward/` under `root`, deterministically for a seed."""
    start = time.perf_counter()
    rng = random.Random(seed)
    train, test = make_reviews(NUM_TRAIN_REVIEWS, rng), make_reviews(NUM_TEST_REVIEWS, rng)
    DatasetDict(train=Dataset.from_dict(train), test=Dataset.from_dict(test)).save_to_disk(root / "reviews")
    words = [*NEUTRAL_WORDS, *POSITIVE_WORDS, *NEGATIVE_WORDS]
    # fork_rng: building assets mid-run must not disturb the caller's torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy_tokenizer = make_policy_tokenizer(words)
        policy = train_policy(policy_tokenizer, train["text"])
        policy.save_pretrained(root / "policy")
        policy_tokenizer.save_pretrained(root / "policy")

        reward_tokenizer = make_reward_tokenizer(words)
        reward = train_reward(reward_tokenizer, train, test)
        reward.save_pretrained(root / "reward")
        reward_tokenizer.save_pretrained(root / "reward")
    logger.info("Built the tiny assets in %.1f s", time.perf_counter() - start)


def make_reviews(n: int, rng: random.Random) -> dict[str, list]:
    """`n` bag-of-words reviews; label 1 when positive words outnumber negative ones (ties are skipped)."""
    texts, labels = [], []
    while len(texts) < n:
        num_words = rng.randint(8, 20) if rng.random() < SHORT_REVIEW_RATE else rng.randint(40, 70)
        num_pos, num_neg = rng.randint(0, 6), rng.randint(0, 6)
        if num_pos == num_neg or num_pos + num_neg > num_words:
            continue
        review = rng.choices(NEUTRAL_WORDS, k=num_words - num_pos - num_neg)
        review += rng.choices(POSITIVE_WORDS, k=num_pos) + rng.choices(NEGATIVE_WORDS, k=num_neg)
        rng.shuffle(review)
        texts.append(" ".join(review))
        labels.append(int(num_pos > num_neg))
    return {"text": texts, "label": labels}


def make_policy_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """GPT-2-like word-level tokenizer: a word inside a text is its own `Ġword` token, as in byte-level BPE.

    So `decode(response)` keeps the leading space and `query + response` reads as one text; pad is left
    unset, as in GPT-2 (the trainer sets pad = eos).
    """
    vocab = [EOS_TOKEN, UNK_TOKEN, *words, *("Ġ" + w for w in words)]
    backend = Tokenizer(WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_POSITIONS,
    )


def make_reward_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """DistilBERT-like word-level tokenizer: `[CLS] text [SEP]`, right padding."""
    vocab = [*REWARD_SPECIAL_TOKENS, *words]
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(WordLevel(ids, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece()  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        model_max_length=MAX_POSITIONS,
    )


def train_policy(tokenizer: PreTrainedTokenizerFast, texts: list[str], steps: int = 200) -> GPT2LMHeadModel:
    """A tiny GPT-2 trained as a language model on the reviews, as `lvwerra/gpt2-imdb` was on IMDB."""
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=MAX_POSITIONS, vocab_size=len(tokenizer),
        bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    # One stream of reviews, each followed by eos, cut into random windows of `seq_len` tokens.
    stream = torch.tensor([t for ids in tokenizer(texts).input_ids for t in [*ids, eos_id]])
    seq_len, batch_size = 32, 32
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,))
        batch = stream[starts[:, None] + torch.arange(seq_len)]  # (B, T)
        logits = model(input_ids=batch).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("tiny policy step %d: lm loss %.3f", step, loss.item())
    return model.eval()


def train_reward(
    tokenizer: PreTrainedTokenizerFast, train: dict[str, list], test: dict[str, list], steps: int = 300
) -> DistilBertForSequenceClassification:
    """A tiny DistilBERT sentiment classifier; its POSITIVE logit is the reward, as in the notebook."""
    config = DistilBertConfig(
        vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
        max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    model = DistilBertForSequenceClassification(config)
    inputs = tokenizer(train["text"], padding=True, truncation=True, return_tensors="pt")
    labels = torch.tensor(train["label"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch_size = 32
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,))
        out = model(
            input_ids=inputs.input_ids[idx], attention_mask=inputs.attention_mask[idx], labels=labels[idx]
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("tiny reward step %d: loss %.3f", step, out.loss.item())
    model.eval()
    test_inputs = tokenizer(test["text"], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**test_inputs).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(test["label"])).float().mean().item()
    logger.info("tiny reward model test accuracy: %.3f", accuracy)
    if accuracy < 0.9:  # a broken recipe, not a user mistake: fail the build loudly
        raise RuntimeError(f"tiny reward model reached only {accuracy:.3f} test accuracy (needs >= 0.9)")
    return model
