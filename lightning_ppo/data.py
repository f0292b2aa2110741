"""Prompts for PPO, by the notebook's recipe: texts over 200 characters cut to their first 2..7 tokens."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from lightning_ppo.errors import ConfigError, check_number
from lightning_ppo.loading import check_fits_context, load_from_source
from lightning_ppo.models import load_tokenizer
from lightning_ppo.prompts import (
    OVERLONG_CHOICES,
    RESERVED_COLUMNS,
    OverlongPrompts,
    PromptColumn,
    PromptSource,
    TextOpenings,
)
from lightning_ppo.resumable import resumable_loader

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")  # data files read as text: UTF-8 only


def check_utf8(path: Path, key: str) -> None:
    """Refuse a text file that is not UTF-8: `datasets` fails on it deep in its builders, or reads a JSON
    lines file as mojibake. Line by line is exact: no UTF-8 sequence holds the newline byte."""
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = line[error.start : error.start + 1].hex()
                raise ConfigError(
                    f"{key}: the file {str(path)!r} is not UTF-8 text (byte {error.start + 1} of line "
                    f"{number} is 0x{bad}); it must be UTF-8. Save it again as UTF-8, e.g. `iconv -f latin1 "
                    f"-t utf-8 {path} > {path.with_stem(path.stem + '-utf8')}`"
                ) from error


def load_prompt_dataset(source: str) -> DatasetDict:
    """Load a `save_to_disk` folder, a json/jsonl/csv/parquet file or folder of them, or a hub dataset."""
    path = Path(source)
    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json")):
        empty = empty_saved_splits(path)
        if empty:  # `load_from_disk` fails on them with a bare IndexError
            where = "its dataset" if empty == [None] else f"split {', '.join(map(repr, empty))}"
            raise ConfigError(
                f"data.dataset={source!r}: the `save_to_disk` folder {path.absolute()} holds 0 rows in "
                f"{where}; save the texts again with rows in every split, or point data.dataset at another "
                "dataset"
            )
        loaded = load_from_disk(source)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    if path.is_file():
        if path.stat().st_size == 0:  # `datasets` fails on it with a bare StopIteration
            raise ConfigError(f"data.dataset: the file {source!r} is empty; give a file with texts")
        if path.suffix not in FILE_BUILDERS:
            raise ConfigError(f"data.dataset: cannot read {source!r}; use one of {sorted(FILE_BUILDERS)}")
        if path.suffix in TEXT_SUFFIXES:
            check_utf8(path, "data.dataset")
        return load_dataset(FILE_BUILDERS[path.suffix], data_files=source)  # one "train" split
    # A hub name, or a local folder of data files (`datasets` infers the format and splits from file names).
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix in TEXT_SUFFIXES and file.is_file() and not file.name.startswith("."):
                check_utf8(file, "data.dataset")
    return load_dataset(source)


def empty_saved_splits(folder: Path) -> list[str | None]:
    """The splits of a `save_to_disk` folder saved with 0 rows (no data files); [None]: a 0-row Dataset."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        states = {split: folder / split / "state.json" for split in splits}
    else:
        states = {None: folder / "state.json"}
    return [
        split
        for split, state in states.items()
        if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files")
    ]


def numbered(prompts: Dataset) -> Dataset:
    """Held-out prompts with an `index` column (their position), so results gathered from ranks that
    evaluated a padded share (see `EvalSampler`) keep each prompt once."""
    return prompts.add_column("index", list(range(len(prompts))))


class EvalSampler(DistributedSampler):
    """This rank's share of the held-out prompts, in order, padded as `DistributedSampler` pads.

    Every rank then runs the same number of equal batches: generation and forward passes under ZeRO-3
    are collectives that hang if one rank has a batch more (Lightning's `UnrepeatedDistributedSampler`
    allows that). The repeated prompts are dropped by `index` when results are gathered.
    Being a `DistributedSampler`, Lightning leaves it in place instead of injecting its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def collate_prompts(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack prompts LEFT-padded, so generation continues every prompt from the same last column.

    The batch also holds `query` (B strings), `columns` (the rows' other columns: name -> B values), chat
    prompts their `prompt_messages`, and held-out prompts their `index` (B,) long.
    """
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, P)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, width - length :] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, width - length :] = 1
    queries = [example["query"] for example in examples]
    others = [name for name in examples[0] if name not in RESERVED_COLUMNS]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "query": queries,
        "columns": {name: [example[name] for example in examples] for name in others},
    }
    if "prompt_messages" in examples[0]:
        batch["prompt_messages"] = [example["prompt_messages"] for example in examples]
    if "index" in examples[0]:
        batch["index"] = torch.tensor([example["index"] for example in examples], dtype=torch.long)  # (B,)
    return batch


def check_prompt_settings(
    datamodule: Any, stage: str, ppo: Any, sampling: Any, policy: Any, source: str
) -> None:
    """Before a run: the batch splits into PPO minibatches, and the longest prompt plus the longest
    response fits the `policy` LM's context. Settings a data module lacks are not checked."""
    hparams = getattr(datamodule, "hparams", {})

    def setting(name: str) -> Any:
        return hparams[name] if name in hparams else getattr(datamodule, name, None)

    if stage == "fit" and setting("batch_size") is not None:
        ppo.check_batch_size(setting("batch_size"), samples_per_prompt=sampling.num_samples_per_prompt)
    key = "predict_prompt_max_tokens" if stage == "predict" else "prompt_max_tokens"
    if setting(key) is not None:
        check_fits_context(policy.config, setting(key), f"data.{key}", sampling.response_max_length, source)


class PromptDataModule(LightningDataModule):
    """Prompts cut from the opening words of texts; each batch holds `input_ids`, `attention_mask`, `query`.

    Args:
        dataset: Hub dataset name (`load_dataset`), a `save_to_disk` folder, a .json/.jsonl/.csv/.parquet
            file or a folder of such files, or `tiny:reviews` (built offline).
        tokenizer: The policy's tokenizer (hub id or folder), required by `setup`; the CLI links
            `model.policy` into it.
        text_column: Column of texts whose openings are the prompts (the notebook's recipe), when
            `prompt_column` is null.
        prompt_column: Column of prompts, each a string or a list of chat messages (`{"role", "content"}`)
            rendered with the policy tokenizer's chat template; null: prompts cut from `text_column`.
            The row's other columns reach the reward (`columns=`).
        chat_template: Wrap string prompts of `prompt_column` as one user message of the chat template.
        overlong_prompts: Prompts of `prompt_column` longer than `prompt_max_tokens`: "drop" them (the
            count is printed), "refuse" (an error) or "truncate_left" (keep their last tokens).
        train_split: Split that PPO trains on.
        eval_split: Held-out split for validation and test; when the dataset lacks it (or it is None),
            `eval_fraction` of the train split is held out instead (seeded).
        eval_fraction: Fraction of the train split held out when there is no `eval_split`.
        min_text_length: Keep texts longer than this many characters (the notebook keeps > 200).
        prompt_min_tokens: Shortest prompt, in tokens.
        prompt_max_tokens: Longest prompt, in tokens. From `text_column`, each prompt's length is drawn
            uniformly from [prompt_min_tokens, prompt_max_tokens] (TRL's `LengthSampler(2, 8)` draws 2..7).
        batch_size: Prompts per PPO step per device.
        eval_batch_size: Prompts per validation/test/predict batch; defaults to `batch_size`.
        val_size: Held-out prompts used by validation.
        test_size: Held-out prompts used by `test` (the notebook compared 16); the first ones of the same
            shuffled held-out prompts as validation.
        predict_file: Prompts for `predict`: a .txt file (one per line) or .jsonl/.json records with a
            "prompt" field (or `prompt_column`, or `text_column`); their other fields are kept.
        predict_prompt_max_tokens: Predict prompts are truncated to this many tokens.
        num_workers: DataLoader worker processes.
        seed: Seeds the held-out split, the shuffle of the held-out prompts, the prompt lengths and the
            order of the training prompts in each epoch.
    """

    def __init__(
        self,
        dataset: str = "imdb",
        tokenizer: str | None = None,
        text_column: str = "text",
        prompt_column: str | None = None,
        chat_template: bool = False,
        overlong_prompts: OverlongPrompts = "drop",
        train_split: str = "train",
        eval_split: str | None = "test",
        eval_fraction: float = 0.05,
        min_text_length: int = 200,
        prompt_min_tokens: int = 2,
        prompt_max_tokens: int = 7,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 128,
        test_size: int = 16,
        predict_file: str | None = None,
        predict_prompt_max_tokens: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_number("data.eval_fraction", eval_fraction, 0, 1, open_low=True, open_high=True)
        for name, value, low in [
            ("min_text_length", min_text_length, 0),
            ("prompt_min_tokens", prompt_min_tokens, 1),
            ("prompt_max_tokens", prompt_max_tokens, 1),
            ("batch_size", batch_size, 1),
            ("val_size", val_size, 1),
            ("test_size", test_size, 1),
            ("predict_prompt_max_tokens", predict_prompt_max_tokens, 1),
            ("num_workers", num_workers, 0),
            ("seed", seed, 0),  # numpy's generators refuse negative seeds
        ]:
            check_number(f"data.{name}", value, low, integer=True)
        check_number("data.eval_batch_size", eval_batch_size, 1, integer=True, optional=True)
        if prompt_min_tokens > prompt_max_tokens:
            raise ConfigError(
                f"data.prompt_min_tokens ({prompt_min_tokens}) exceeds data.prompt_max_tokens "
                f"({prompt_max_tokens}); raise the maximum or lower the minimum"
            )
        if overlong_prompts not in OVERLONG_CHOICES:
            raise ConfigError(
                f"data.overlong_prompts must be one of {', '.join(OVERLONG_CHOICES)}, got "
                f"{overlong_prompts!r}"
            )
        self.save_hyperparameters()
        self.eval_batch_size = eval_batch_size or batch_size
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.prompts: dict[str, Dataset] = {}  # "train", "val", "test" or "predict" -> its prompts

    @property
    def batch_size(self) -> int:
        return self.hparams.batch_size

    def prompt_source(self, predicting: bool = False, column: str | None = None) -> PromptSource:
        """The source of `data.prompt_column` (a column of prompts), else the notebook's text openings."""
        h = self.hparams
        if h.prompt_column is None:
            if predicting:  # predict files hold whole prompts: their first tokens, up to the limit
                return TextOpenings(
                    column, -1, h.predict_prompt_max_tokens, h.predict_prompt_max_tokens, h.seed
                )
            return TextOpenings(
                h.text_column, h.min_text_length, h.prompt_min_tokens, h.prompt_max_tokens, h.seed
            )
        limit = h.predict_prompt_max_tokens if predicting else h.prompt_max_tokens
        key = "data.predict_prompt_max_tokens" if predicting else "data.prompt_max_tokens"
        return PromptColumn(column or h.prompt_column, limit, h.chat_template, h.overlong_prompts, key)

    def setup(self, stage: str) -> None:
        """Load the tokenizer and only the prompts `stage` needs."""
        if self.hparams.tokenizer is None:
            raise ConfigError(
                "data.tokenizer is not set: give the policy's tokenizer (the CLI links model.policy)"
            )
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        if stage == "predict":
            self.prompts["predict"] = self._predict_prompts()
            return
        train, held_out = self._splits()
        source = self.prompt_source()
        if stage == "fit":
            self.prompts["train"] = source(train, self.tokenizer, self.hparams.train_split)
            self._check_enough_train_prompts(len(train), source)
        eval_prompts = source(held_out, self.tokenizer, "held-out").shuffle(seed=self.hparams.seed)
        if len(eval_prompts) == 0:
            raise ConfigError(
                f"none of the {len(held_out)} held-out {source.noun} of {self.hparams.dataset!r} gives a "
                f"prompt ({source.settings}); {source.hint}, or raise data.eval_fraction"
            )
        if stage in ("fit", "validate"):
            self.prompts["val"] = numbered(eval_prompts.take(self.hparams.val_size))
        if stage == "test":
            self.prompts["test"] = numbered(eval_prompts.take(self.hparams.test_size))

    def train_dataloader(self) -> DataLoader:
        """Shuffled by `seed` and the epoch; checkpoints record its position, so a resumed fit goes on."""
        trainer = self.trainer
        world = (trainer.distributed_sampler_kwargs if trainer else None) or {}  # DDP: this rank's share
        collate = partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)
        return resumable_loader(
            self.prompts["train"],
            self.hparams.batch_size,
            self.hparams.seed,
            world,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.prompts["val"], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.prompts["test"], self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.prompts["predict"], self.eval_batch_size)

    def _loader(self, prompts: Dataset, batch_size: int) -> DataLoader:
        """In order; under DDP or DeepSpeed each rank takes its (padded) share, see `EvalSampler`."""
        trainer = self.trainer
        world = (trainer.distributed_sampler_kwargs if trainer else None) or {}
        collate = partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)
        return DataLoader(
            prompts,
            batch_size=batch_size,
            sampler=EvalSampler(prompts, **world),
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
        )

    def _splits(self) -> tuple[Dataset, Dataset]:
        """The train split and the held-out texts: `eval_split`, or a seeded `eval_fraction` of train."""
        h = self.hparams
        data = load_from_source(load_prompt_dataset, h.dataset, "data.dataset", "dataset")
        if h.train_split not in data:
            raise ConfigError(
                f"data.train_split={h.train_split!r} is not a split of {h.dataset!r}: {list(data)}"
            )
        train = data[h.train_split]
        source = self.prompt_source()
        column, key = source.column, source.key
        if column not in train.column_names:
            raise ConfigError(
                f"{key}={column!r} is not a column of {h.dataset!r}; its columns are {train.column_names}"
            )
        if h.eval_split is not None and h.eval_split in data:
            return train, data[h.eval_split]
        kept = math.floor((1 - h.eval_fraction) * len(train))  # as `train_test_split` rounds
        if kept < 1:
            raise ConfigError(
                f"data.dataset={h.dataset!r} has {len(train)} text(s) in split {h.train_split!r} and "
                f"no held-out split (data.eval_split={h.eval_split!r}); holding out data.eval_fraction="
                f"{h.eval_fraction} of them leaves none to train on. Add texts, or name a held-out split "
                "with data.eval_split."
            )
        split = train.train_test_split(test_size=h.eval_fraction, seed=h.seed)
        return split["train"], split["test"]

    def _predict_prompts(self) -> Dataset:
        """Prompts from `predict_file`, truncated to `predict_prompt_max_tokens`."""
        if self.hparams.predict_file is None:
            raise ConfigError(
                "data.predict_file is not set: give a .txt (one prompt per line) or .jsonl file"
            )
        path = Path(self.hparams.predict_file)
        if not path.is_file():
            raise ConfigError(f"data.predict_file {str(path)!r}: no such file ({path.absolute()})")
        check_utf8(path, "data.predict_file")
        no_prompts = ConfigError(
            f"data.predict_file {str(path)!r} holds no prompts, so predict would write nothing; give a .txt "
            "file with one prompt per non-blank line, or .jsonl records with a 'prompt' field"
        )
        if path.suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            records = Dataset.from_dict({"prompt": [line for line in lines if line.strip()]})
        elif not path.read_bytes().strip():  # `datasets` reads no columns from it
            raise no_prompts
        else:
            records = load_dataset("json", data_files=str(path), split="train")
        fallback = self.hparams.prompt_column or self.hparams.text_column
        column = "prompt" if "prompt" in records.column_names else fallback
        if column not in records.column_names:
            raise ConfigError(
                f"data.predict_file {str(path)!r} needs a 'prompt' or {fallback!r} field; "
                f"it has {records.column_names}"
            )
        prompts = self.prompt_source(predicting=True, column=column)(records, self.tokenizer, "predict")
        if len(prompts) == 0:
            raise no_prompts
        return numbered(prompts)

    def _check_enough_train_prompts(self, num_texts: int, source: PromptSource) -> None:
        """Each rank needs one full batch: `batch_size` prompts per rank (the last partial one is dropped)."""
        usable = len(self.prompts["train"])
        world_size = self.trainer.world_size if self.trainer else 1
        if usable < self.hparams.batch_size * world_size:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise ConfigError(
                f"only {usable} of {num_texts} {source.noun} in split {self.hparams.train_split!r} of "
                f"{self.hparams.dataset!r} give a prompt ({source.settings}), fewer than "
                f"data.batch_size={self.hparams.batch_size}{ranks}: {source.hint}, or lower data.batch_size"
            )


def repeat_prompts(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """Each prompt of the batch k times in a row: rows [i*k, (i+1)*k) are prompt i's group."""
    if k == 1:
        return batch

    def repeat(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.repeat_interleave(k, dim=0)
        if isinstance(value, dict):  # the rows' other columns
            return {name: repeat(column) for name, column in value.items()}
        return [v for v in value for _ in range(k)]

    return {name: repeat(value) for name, value in batch.items()}
