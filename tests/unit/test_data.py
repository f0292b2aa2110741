"""PromptDataModule applies the notebook's prompt recipe the same way for every kind of source."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from lightning_ppo.data import PromptDataModule, collate_prompts, load_prompt_dataset
from lightning_ppo.tiny import NEUTRAL_WORDS
from tests.helpers import seeded


def make_texts(num_long: int, num_short: int = 0, seed: int = 0) -> list[str]:
    """Texts over the tiny vocabulary: long ones (> 200 characters) and short ones (< 200), shuffled."""
    rng = random.Random(seeded(seed))
    texts = [" ".join(rng.choices(NEUTRAL_WORDS, k=60)) for _ in range(num_long)]
    texts += [" ".join(rng.choices(NEUTRAL_WORDS, k=5)) for _ in range(num_short)]
    rng.shuffle(texts)
    assert sum(len(text) > 200 for text in texts) == num_long
    return texts


def save_splits(path: Path, **splits: list[str]) -> Path:
    """Save texts as a `save_to_disk` DatasetDict with the given splits."""
    DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in splits.items()}).save_to_disk(
        path
    )
    return path


@pytest.fixture
def tokenizer_dir(tiny_assets: Path) -> str:
    return str(tiny_assets / "policy")


def make_module(dataset: str | Path, tokenizer: str, **kwargs) -> PromptDataModule:
    kwargs = {"batch_size": 4, "val_size": 8, "test_size": 4, **kwargs}
    return PromptDataModule(dataset=str(dataset), tokenizer=tokenizer, **kwargs)


def lengths(prompts: Dataset) -> list[int]:
    return [len(ids) for ids in prompts["input_ids"]]


def test_every_format_gives_the_same_prompts(tmp_path: Path, tokenizer_dir: str) -> None:
    train = Dataset.from_dict({"text": make_texts(30, 5), "label": [0, 1] * 17 + [0]})
    DatasetDict(train=train).save_to_disk(tmp_path / "saved")
    train.to_json(tmp_path / "reviews.jsonl")
    train.to_csv(tmp_path / "reviews.csv", index=False)
    train.to_parquet(tmp_path / "reviews.parquet")
    sources = ["saved", "reviews.jsonl", "reviews.csv", "reviews.parquet"]

    prompts = {}
    for source in sources:
        module = make_module(tmp_path / source, tokenizer_dir)
        module.setup("fit")
        prompts[source] = (module.prompts["train"][:], module.prompts["val"][:])
    assert len(prompts["saved"][0]["query"]) + len(prompts["saved"][1]["query"]) == 30  # the long texts
    for source in sources[1:]:
        assert prompts[source] == prompts["saved"], source


def test_folder_of_files_keeps_its_splits(tmp_path: Path) -> None:
    (tmp_path / "reviews").mkdir()
    Dataset.from_dict({"text": make_texts(6)}).to_json(tmp_path / "reviews" / "train.jsonl")
    Dataset.from_dict({"text": make_texts(3, seed=1)}).to_json(tmp_path / "reviews" / "test.jsonl")
    data = load_prompt_dataset(str(tmp_path / "reviews"))
    assert {split: len(texts) for split, texts in data.items()} == {"train": 6, "test": 3}


def test_single_saved_dataset_becomes_the_train_split(tmp_path: Path) -> None:
    Dataset.from_dict({"text": make_texts(5)}).save_to_disk(tmp_path / "saved")
    data = load_prompt_dataset(str(tmp_path / "saved"))
    assert list(data) == ["train"] and len(data["train"]) == 5


def test_length_filter_drops_short_texts(tmp_path: Path, tokenizer_dir: str) -> None:
    boundary = ["the " * 49 + "film", "the " * 50 + "film"]  # 200 and 204 characters: only the second stays
    texts = make_texts(20, 7) + boundary
    data = save_splits(tmp_path / "d", train=texts)

    module = make_module(data, tokenizer_dir, eval_split=None, eval_fraction=0.2)
    module.setup("fit")
    assert len(module.prompts["train"]) + len(module.prompts["val"]) == 21

    keep_all = make_module(data, tokenizer_dir, eval_split=None, eval_fraction=0.2, min_text_length=0)
    keep_all.setup("fit")
    assert len(keep_all.prompts["train"]) + len(keep_all.prompts["val"]) == 29


def test_prompt_lengths_are_uniform_in_range_and_seeded(tmp_path: Path, tokenizer_dir: str) -> None:
    data = save_splits(tmp_path / "d", train=make_texts(200))

    def train_lengths(seed: int) -> list[int]:
        module = make_module(data, tokenizer_dir, prompt_min_tokens=3, prompt_max_tokens=6, seed=seed)
        module.setup("fit")
        return lengths(module.prompts["train"])

    first = train_lengths(seed=0)
    assert set(first) == {3, 4, 5, 6}  # min and max inclusive, every value drawn
    assert train_lengths(seed=0) == first
    assert train_lengths(seed=1) != first


def test_query_is_the_decoded_prompt(tiny_assets: Path, tokenizer_dir: str) -> None:
    module = make_module("tiny:reviews", tokenizer_dir)
    module.setup("fit")
    train = module.prompts["train"]
    assert set(lengths(train)) == set(range(2, 8))  # the notebook's LengthSampler(2, 8)
    for row in train.select(range(50)):
        assert row["query"] == module.tokenizer.decode(row["input_ids"])
    texts = list(load_prompt_dataset(str(tiny_assets / "reviews"))["train"]["text"])
    assert all(any(text.startswith(row["query"]) for text in texts) for row in train.select(range(5)))


def test_collate_left_pads() -> None:
    examples = [{"input_ids": [5, 6, 7], "query": "a b c"}, {"input_ids": [8], "query": "d"}]
    batch = collate_prompts(examples, pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [0, 0, 8]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["query"] == ["a b c", "d"]


def test_batches_are_left_padded_with_eos(tmp_path: Path, tokenizer_dir: str) -> None:
    data = save_splits(tmp_path / "d", train=make_texts(40))
    module = make_module(data, tokenizer_dir, batch_size=16)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends in the last column
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == module.tokenizer.eos_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [
        len(module.tokenizer(q).input_ids) for q in batch["query"]
    ]


def test_held_out_fraction_when_there_is_no_eval_split(tmp_path: Path, tokenizer_dir: str) -> None:
    rows = Dataset.from_dict({"text": make_texts(100), "row": list(range(100))})
    DatasetDict(train=rows).save_to_disk(tmp_path / "d")
    module = make_module(tmp_path / "d", tokenizer_dir, eval_fraction=0.1, val_size=100)
    module.setup("fit")
    assert len(module.prompts["train"]) == 90 and len(module.prompts["val"]) == 10

    # each text once: in the training prompts or held out, never both (the loaders hand out its `row`)
    trained = [row for batch in module.train_dataloader() for row in batch["columns"]["row"]]
    held_out = [row for batch in module.val_dataloader() for row in batch["columns"]["row"]]
    assert len(trained) == 88 and len(held_out) == 10  # 22 full batches of 4; the partial one is dropped
    assert not set(trained) & set(held_out)
    assert sorted(set(module.prompts["train"]["row"]) | set(held_out)) == list(range(100))


def test_eval_split_none_holds_out_from_train(tmp_path: Path, tokenizer_dir: str) -> None:
    data = save_splits(tmp_path / "d", train=make_texts(40), test=make_texts(10, seed=1))
    with_test = make_module(data, tokenizer_dir, val_size=100)
    with_test.setup("fit")
    assert (len(with_test.prompts["train"]), len(with_test.prompts["val"])) == (40, 10)

    without = make_module(data, tokenizer_dir, val_size=100, eval_split=None, eval_fraction=0.25)
    without.setup("fit")
    assert (len(without.prompts["train"]), len(without.prompts["val"])) == (30, 10)


def test_stages_load_only_what_they_need(tokenizer_dir: str) -> None:
    module = make_module("tiny:reviews", tokenizer_dir, val_size=8, test_size=4)
    module.setup("validate")
    assert list(module.prompts) == ["val"] and len(module.prompts["val"]) == 8
    module.setup("test")
    assert list(module.prompts) == ["val", "test"]
    assert module.prompts["test"][:] == module.prompts["val"].select(range(4))[:]  # same shuffled prompts
    assert len(next(iter(module.test_dataloader()))["query"]) == 4


def test_train_loader_drops_the_last_partial_batch(tmp_path: Path, tokenizer_dir: str) -> None:
    data = save_splits(tmp_path / "d", train=make_texts(10), test=make_texts(10, seed=1))
    module = make_module(data, tokenizer_dir, batch_size=4, eval_batch_size=3, val_size=10)
    module.setup("fit")
    assert [len(batch["query"]) for batch in module.train_dataloader()] == [4, 4]
    assert [len(batch["query"]) for batch in module.val_dataloader()] == [3, 3, 3, 1]


def test_predict_prompts_from_txt(tmp_path: Path, tokenizer_dir: str) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\n\nthis film is about the war and the family of the hero\nit\n")
    module = make_module("unused", tokenizer_dir, predict_file=str(prompts), predict_prompt_max_tokens=6)
    module.setup("predict")
    batch = next(iter(module.predict_dataloader()))
    assert batch["query"] == ["the movie was", "this film is about the war", "it"]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6, [0] * 5 + [1]]


def test_predict_prompts_from_jsonl(tmp_path: Path, tokenizer_dir: str) -> None:
    prompts = tmp_path / "prompts.jsonl"
    Dataset.from_dict({"prompt": ["the movie was", "i saw"]}).to_json(prompts)
    module = make_module("unused", tokenizer_dir, predict_file=str(prompts))
    module.setup("predict")
    assert module.prompts["predict"]["query"] == ["the movie was", "i saw"]


def test_missing_text_column_names_the_columns(tmp_path: Path, tokenizer_dir: str) -> None:
    Dataset.from_dict({"review": make_texts(3), "label": [0, 1, 0]}).to_json(tmp_path / "reviews.jsonl")
    module = make_module(tmp_path / "reviews.jsonl", tokenizer_dir)
    with pytest.raises(ValueError, match=r"data\.text_column='text'.*\['review', 'label'\]"):
        module.setup("fit")


def test_too_few_train_prompts_is_an_error(tmp_path: Path, tokenizer_dir: str) -> None:
    data = save_splits(tmp_path / "d", train=make_texts(3, 10), test=make_texts(10, seed=1))
    module = make_module(data, tokenizer_dir, batch_size=8)
    with pytest.raises(ValueError, match=r"only 3 of 13 texts.*min_text_length=200.*batch_size=8"):
        module.setup("fit")


def test_init_loads_nothing_and_checks_the_prompt_range() -> None:
    module = PromptDataModule(dataset="no/such/dataset", tokenizer="no/such/tokenizer")
    assert module.tokenizer is None and module.eval_batch_size == module.batch_size == 128
    with pytest.raises(ValueError, match="data.prompt_min_tokens"):
        PromptDataModule(prompt_min_tokens=5, prompt_max_tokens=4)
    with pytest.raises(ValueError, match="data.tokenizer"):
        PromptDataModule(dataset="tiny:reviews").setup("fit")
