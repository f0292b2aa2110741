"""Every input mistake or fault a user can meet ends in one clear outcome: a message that names the key or
file and says what to do (exit 2), or the working result, never a library traceback or a silent non-result.

Config mistakes, missing models and datasets, data edge cases, a sweep over every numeric setting; then
faults in what a run reads and writes: rewards, checkpoints, data files, trainer settings, a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest
import torch
from datasets import Dataset, DatasetDict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import ByteLevelBPETokenizer
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from lightning_ppo import cli, report
from lightning_ppo.checkpointing import AtomicCheckpointIO, read_checkpoint
from lightning_ppo.commands import export_command
from lightning_ppo.config import PPOConfig
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.models import load_causal_lm, load_tokenizer
from lightning_ppo.module import PPOModule
from lightning_ppo.rewards import (
    ClassifierReward,
    FunctionReward,
    RewardModel,
    SampleBatch,
    WeightedSumReward,
    as_scores,
    call_reward,
    score_rollout,
)
from lightning_ppo.rollout import SamplingConfig, sample_responses
from lightning_ppo.shaping import ShapingConfig
from lightning_ppo.tiny import MAX_POSITIONS
from tests.helpers import cli_seed_args, seeded

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
EDGE_TEXTS = [
    "",
    "movie",
    "the film was great " * 400,  # far longer than any context
    "café crème brûlée, naïve façade — Ångström",
    "I loved it 🎬🍿😍 so much 👍🏽",
]


@pytest.fixture(scope="module")
def module(tiny_assets: Path) -> PPOModule:
    return PPOModule(policy="tiny:policy", reward_model="tiny:reward")


def cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in-process expecting a parse error; return what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", TINY, *cli_seed_args(), *args])
    assert exit_info.value.code != 0
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 1. Config mistakes


def test_unknown_key_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    message = cli_error(capsys, "--model.ppo.not_a_key", "3")
    assert '"model.ppo"' in message and "'not_a_key' is not accepted" in message


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert "ppo_epochs" in cli_error(capsys, "--model.ppo.ppo_epochs", "four")


def setup_with(module: PPOModule, stage: str = "fit", **datamodule: int) -> None:
    module._trainer = SimpleNamespace(  # no DeepSpeed
        datamodule=SimpleNamespace(**datamodule), strategy=None, precision="32-true"
    )
    try:
        module.setup(stage)
    finally:
        module._trainer = None


def test_batch_size_not_divisible_by_mini_batch_size(module: PPOModule) -> None:
    mini = module.ppo.mini_batch_size
    setup_with(module, batch_size=2 * mini, prompt_max_tokens=7)
    with pytest.raises(ConfigError, match=r"data\.batch_size .* model\.ppo\.mini_batch_size"):
        setup_with(module, batch_size=mini + 1, prompt_max_tokens=7)


def test_lengths_beyond_the_policy_context(module: PPOModule) -> None:
    response = module.sampling.response_max_length
    setup_with(module, batch_size=module.ppo.mini_batch_size, prompt_max_tokens=MAX_POSITIONS - response)
    with pytest.raises(ConfigError) as error:
        setup_with(module, batch_size=module.ppo.mini_batch_size, prompt_max_tokens=MAX_POSITIONS)
    message = str(error.value)
    assert "data.prompt_max_tokens" in message and "model.sampling.response_max_length" in message
    assert f"{MAX_POSITIONS} positions" in message
    with pytest.raises(ConfigError, match=r"data\.predict_prompt_max_tokens"):
        setup_with(module, "predict", predict_prompt_max_tokens=MAX_POSITIONS)


def test_unknown_reward_label_lists_the_labels(tiny_assets: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.reward_label='HAPPY'.*\['NEGATIVE', 'POSITIVE'\]"):
        ClassifierReward("tiny:reward", "HAPPY")


def test_missing_text_column_lists_the_columns(tiny_assets: Path) -> None:
    data = PromptDataModule(dataset="tiny:reviews", tokenizer="tiny:policy", text_column="review")
    with pytest.raises(ConfigError, match=r"data\.text_column='review'.*\['text', 'label'\]"):
        data.setup("fit")


# ------------------------------------------------------------------------------------------------
# 2. Missing or unreachable models and datasets


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1, also where the libraries read it once at import, and an empty hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys.modules[huggingface_hub.is_offline_mode.__module__], "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    ("key", "load"),
    [
        ("model.policy", lambda source: load_causal_lm(source)),
        ("model.policy", lambda source: load_tokenizer(source)),
        ("model.reward_model", lambda source: ClassifierReward(source)),
        (
            "data.dataset",
            lambda source: PromptDataModule(dataset=source, tokenizer="tiny:policy").setup("fit"),
        ),
    ],
    ids=["policy", "tokenizer", "reward", "dataset"],
)
def test_hub_id_while_offline(offline: None, tiny_assets: Path, key: str, load) -> None:
    with pytest.raises(ConfigError) as error:
        load("nobody-here/no-such-thing")
    message = str(error.value)
    assert f"{key}='nobody-here/no-such-thing'" in message
    assert "locally" in message and "HF_HUB_OFFLINE" in message
    assert "Download it first" in message and "local folder" in message


def test_missing_path_and_folder_without_a_model(tmp_path: Path, tiny_assets: Path) -> None:
    missing = tmp_path / "missing" / "model"
    with pytest.raises(ConfigError, match=r"model\.policy=.*no such file or folder") as error:
        load_causal_lm(str(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(ConfigError, match=r"data\.dataset=.*no such file or folder"):
        PromptDataModule(dataset=str(missing), tokenizer="tiny:policy").setup("fit")

    with pytest.raises(ConfigError, match=r"model\.policy='tiny:nope': Unknown tiny asset"):
        load_causal_lm("tiny:nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model\.reward_model=.*holds no model") as error:
        ClassifierReward(str(empty))
    assert str(empty) in str(error.value)
    with pytest.raises(ConfigError, match=r"data\.dataset=.*holds no dataset"):
        PromptDataModule(dataset=str(empty), tokenizer="tiny:policy").setup("fit")


def test_tokenizer_without_pad_token_pads_with_eos(tiny_assets: Path) -> None:
    assert AutoTokenizer.from_pretrained(tiny_assets / "policy").pad_token is None
    tokenizer = load_tokenizer("tiny:policy")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert tokenizer.padding_side == "left"


def test_reward_with_another_tokenizer_scores_the_decoded_text(module: PPOModule, tiny_assets: Path) -> None:
    text = "the movie was great"
    policy_ids = module.tokenizer(text)["input_ids"]
    assert policy_ids != module.reward.tokenizer(text)["input_ids"][1:-1]  # the vocabularies differ

    torch.manual_seed(seeded(0))
    prompts = module.tokenizer(["the movie was", "this film is a"], padding=True, return_tensors="pt")
    rollout = sample_responses(
        module.policy.lm,
        prompts["input_ids"],
        prompts["attention_mask"],
        torch.tensor([6, 9]),
        SamplingConfig(),
        pad_token_id=module.tokenizer.pad_token_id,
        eos_token_id=module.tokenizer.eos_token_id,
    )
    scores, _ = score_rollout(module.reward, module.tokenizer, rollout, {})

    texts = [
        module.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(rollout.input_ids, rollout.attention_mask, strict=True)
    ]
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_assets / "reward").eval()
    reward_tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "reward")
    with torch.no_grad():
        logits = classifier(**reward_tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = logits[:, classifier.config.label2id["POSITIVE"]]
    torch.testing.assert_close(scores, expected)


def test_config_error_prints_one_paragraph_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(message: str, kind: type[Exception]) -> None:
        raise kind(message)

    monkeypatch.setattr(sys, "argv", ["lightning-ppo", "fit"])
    monkeypatch.setattr(cli, "main", lambda args: fail("model.reward_label is wrong", ConfigError))
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "lightning-ppo: error: model.reward_label is wrong\n"

    monkeypatch.setattr(cli, "main", lambda args: fail("a bug", RuntimeError))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        cli.run()


@pytest.mark.slow
def test_python_m_lightning_ppo_exits_2_without_traceback(tiny_assets: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["fit", "--config", TINY, *cli_seed_args(), "--model.reward_label", "HAPPY"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_ppo", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "lightning-ppo: error: model.reward_label='HAPPY'" in done.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--model.sampling.temperature", "0"], "model.sampling.temperature must be a number > 0"),
        (["--model.ppo.ppo_epochs", "0"], "model.ppo.ppo_epochs must be an integer >= 1"),
        (["--data.eval_fraction", "2"], "data.eval_fraction must be a number in (0, 1)"),
    ],
)
def test_a_bad_value_inside_a_config_class_is_one_paragraph_too(
    flag: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """jsonargparse re-raises the errors of the classes it builds; the ConfigError behind them is shown."""
    monkeypatch.setattr(sys, "argv", ["lightning-ppo", "fit", "--config", TINY, *cli_seed_args(), *flag])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"lightning-ppo: error: {message}")


# ------------------------------------------------------------------------------------------------
# 3. Data edge cases


def setup_error(dataset: Path) -> str:
    data = PromptDataModule(dataset=str(dataset), tokenizer="tiny:policy", batch_size=8, min_text_length=10)
    with pytest.raises(ConfigError) as error:
        data.setup("fit")
    return str(error.value)


def test_too_few_prompts_and_empty_datasets_are_refused(tmp_path: Path, tiny_assets: Path) -> None:
    train = ["the movie was great and the plot was fun"] * 5 + ["short"] * 4
    splits = {"train": Dataset.from_dict({"text": train}), "test": Dataset.from_dict({"text": ["a b c"]})}
    DatasetDict(splits).save_to_disk(tmp_path / "few")
    message = setup_error(tmp_path / "few")
    assert "only 5 of 9 texts" in message and "data.batch_size=8" in message
    assert "data.min_text_length=10" in message

    splits["train"] = Dataset.from_dict({"text": ["short"] * 3})
    DatasetDict(splits).save_to_disk(tmp_path / "none_usable")
    assert "only 0 of 3 texts" in setup_error(tmp_path / "none_usable")

    (tmp_path / "empty.jsonl").write_text("")
    assert "data.dataset: the file" in setup_error(tmp_path / "empty.jsonl")
    (tmp_path / "header_only.csv").write_text("text\n")
    assert re.search(
        r"data\.dataset=.*header_only\.csv.*holds no dataset", setup_error(tmp_path / "header_only.csv")
    )


def edge_prompts(tokenizer: str, tmp_path: Path, prompt_min_tokens: int, prompt_max_tokens: int) -> Dataset:
    path = tmp_path / f"edge{prompt_min_tokens}-{prompt_max_tokens}"
    DatasetDict(train=Dataset.from_dict({"text": EDGE_TEXTS})).save_to_disk(path)
    data = PromptDataModule(
        dataset=str(path),
        tokenizer=tokenizer,
        batch_size=1,
        min_text_length=0,
        prompt_min_tokens=prompt_min_tokens,
        prompt_max_tokens=prompt_max_tokens,
        eval_split=None,
        eval_fraction=0.2,
    )
    data.setup("fit")
    return data.prompt_source()(Dataset.from_dict({"text": EDGE_TEXTS}), data.tokenizer, "train")


def test_edge_texts_with_the_tiny_tokenizer(tmp_path: Path, tiny_assets: Path) -> None:
    prompts = edge_prompts("tiny:policy", tmp_path, 3, 5)
    assert len(prompts) == len(EDGE_TEXTS) - 1  # the empty text gives no prompt
    assert all(1 <= len(ids) <= 5 for ids in prompts["input_ids"])
    assert len(prompts["input_ids"][0]) == 1  # "movie": shorter than asked, kept whole


@pytest.fixture
def byte_level_tokenizer(tmp_path: Path) -> str:
    """A GPT-2-style byte-level BPE tokenizer trained in-process, saved as a folder."""
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(EDGE_TEXTS * 4, vocab_size=400, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path / "bpe")
    return str(tmp_path / "bpe")


def test_edge_texts_round_trip_with_a_byte_level_tokenizer(tmp_path: Path, byte_level_tokenizer: str) -> None:
    prompts = edge_prompts(byte_level_tokenizer, tmp_path, 64, 64)
    queries = prompts["query"]
    assert len(queries) == len(EDGE_TEXTS) - 1
    for text in (EDGE_TEXTS[1], EDGE_TEXTS[3], EDGE_TEXTS[4]):  # short enough to fit whole
        assert text in queries
    (long,) = [row for row in prompts if "great" in row["query"]]
    assert len(long["input_ids"]) == 64 and EDGE_TEXTS[2].startswith(long["query"])


def test_reward_scores_edge_texts(tiny_assets: Path) -> None:
    scores = ClassifierReward("tiny:reward", batch_size=2)(EDGE_TEXTS)
    assert scores.shape == (len(EDGE_TEXTS),) and torch.isfinite(scores).all()


def test_prompt_lengths_stay_within_bounds(tmp_path: Path, byte_level_tokenizer: str) -> None:
    prompts = edge_prompts(byte_level_tokenizer, tmp_path, 2, 4)
    for ids, query in zip(prompts["input_ids"], prompts["query"], strict=True):
        assert 1 <= len(ids) <= 4
        assert re.sub(r"\s", "", query)  # never an empty prompt


# ------------------------------------------------------------------------------------------------
# 4. A sweep over every numeric setting: 0, a negative value and a wrong type each end in exit 2


# key -> whether 0 is a valid value (it is then not swept)
NUMERIC_KEYS = {
    "data.eval_fraction": False,
    "data.min_text_length": True,
    "data.prompt_min_tokens": False,
    "data.prompt_max_tokens": False,
    "data.batch_size": False,
    "data.eval_batch_size": False,
    "data.val_size": False,
    "data.test_size": False,
    "data.predict_prompt_max_tokens": False,
    "data.num_workers": True,
    "data.seed": True,
    "model.reward_batch_size": False,
    "model.learning_rate": False,
    "model.forward_batch_size": False,
    "model.log_samples_every_n_steps": True,
    "model.num_log_samples": False,
    "model.max_consecutive_bad_steps": False,
    "model.critic_learning_rate": False,
    "model.ppo.ppo_epochs": False,
    "model.ppo.mini_batch_size": False,
    "model.ppo.gradient_accumulation_steps": False,
    "model.ppo.cliprange": False,
    "model.ppo.cliprange_value": False,
    "model.ppo.vf_coef": True,
    "model.ppo.gamma": True,
    "model.ppo.lam": True,
    "model.ppo.ratio_threshold": False,
    "model.ppo.max_grad_norm": False,
    "model.ppo.init_kl_coef": True,
    "model.ppo.target": False,
    "model.ppo.horizon": False,
    "model.ppo.kl_loss_coef": True,
    "model.sampling.response_min_length": False,
    "model.sampling.response_max_length": False,
    "model.sampling.temperature": False,
    "model.sampling.top_k": True,
    "model.sampling.top_p": False,
    "model.sampling.batch_size": False,
    "model.sampling.num_samples_per_prompt": False,
    "model.shaping.missing_eos_penalty": True,
    "model.shaping.score_clip": False,
    "model.lora.r": False,
    "model.lora.alpha": False,
}
SWEEP = [
    (key, value)
    for key, zero_ok in NUMERIC_KEYS.items()
    for value in ([] if zero_ok else ["0"]) + ["-1", "abc"]
]


def sweep_params() -> list:
    """Every case; the fast tier keeps each section's first key, each of its values (the rest is slow)."""
    first_of_section: dict[str, str] = {}
    for key, _ in SWEEP:
        first_of_section.setdefault(key.rpartition(".")[0], key)
    fast = set(first_of_section.values())
    return [
        pytest.param(key, value, id=f"{key}={value}", marks=() if key in fast else pytest.mark.slow)
        for key, value in SWEEP
    ]


def run_cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str]:
    """`lightning-ppo fit --config configs/tiny.yaml ARGS` in-process: its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["lightning-ppo", "fit", "--config", TINY, *cli_seed_args(), *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    return exit_info.value.code, capsys.readouterr().err


def error_paragraph(err: str, loaded: bool = False) -> str:
    """The one paragraph the CLI printed for a mistake, last; alone unless models or data `loaded` (their
    progress bars come first). Lightning may log "Seed set to 0" before it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set to")]
    assert (loaded or len(lines) == 1) and lines[-1].startswith("lightning-ppo: error: "), err
    return lines[-1]


@pytest.mark.parametrize(("key", "value"), sweep_params())
def test_every_numeric_setting_is_checked_before_any_model_loads(
    key: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loads: list[str] = []
    monkeypatch.setattr(
        "lightning_ppo.models.load_tokenizer", lambda source: loads.append(source) or load_tokenizer(source)
    )
    code, err = run_cli(capsys, monkeypatch, f"--{key}", value)
    paragraph = error_paragraph(err)
    assert code == 2
    parent, _, leaf = key.rpartition(".")
    # jsonargparse names a nested dataclass's field as `Parser key "model.ppo": ... Parser key "cliprange"`
    named = key in paragraph if value != "abc" else f'"{parent}' in paragraph and leaf in paragraph
    assert named, paragraph
    assert loads == []  # the value alone is wrong: it failed before the policy was loaded


@pytest.mark.parametrize(
    ("args", "keys"),
    [
        (["--data.prompt_min_tokens", "8"], ["data.prompt_min_tokens", "data.prompt_max_tokens"]),
        (
            ["--model.sampling.response_min_length", "16"],
            ["model.sampling.response_min_length", "model.sampling.response_max_length"],
        ),
        (["--model.ppo.lam", "1.5"], ["model.ppo.lam"]),
        (["--model.sampling.top_p", "nan"], ['"model.sampling"', '"top_p"']),
    ],
)
def test_settings_that_disagree_name_both_keys(
    args: list[str], keys: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(capsys, monkeypatch, *args)
    paragraph = error_paragraph(err)
    assert code == 2 and all(key in paragraph for key in keys), paragraph


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--model.ppo.advantage_estimator", "grpo"],
            ["model.ppo.advantage_estimator='grpo'", "model.sampling.num_samples_per_prompt is 1"],
        ),
        (
            ["--model.ppo.advantage_estimator", "rloo", "--model.sampling.num_samples_per_prompt", "1"],
            ["model.ppo.advantage_estimator='rloo'", "set it to 2 or more"],
        ),
        (
            ["--model.ppo.advantage_estimator", "reinforce_pp", "--model.critic", "tiny:policy"],
            [
                "model.critic='tiny:policy'",
                "model.ppo.advantage_estimator='reinforce_pp'",
                "leave model.critic",
            ],
        ),
    ],
)
def test_estimator_settings_that_make_no_sense_are_refused_before_any_model_loads(
    args: list[str], named: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loads: list[str] = []
    monkeypatch.setattr(
        "lightning_ppo.models.load_tokenizer", lambda source: loads.append(source) or load_tokenizer(source)
    )
    code, err = run_cli(capsys, monkeypatch, *args)
    paragraph = error_paragraph(err)
    assert code == 2 and all(part in paragraph for part in named), paragraph
    assert loads == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--data.batch_size", "48"], ["data.batch_size (48)", "model.ppo.mini_batch_size x"]),
        (  # k samples per prompt: the rollout has batch_size x k rows
            ["--data.batch_size", "8", "--model.sampling.num_samples_per_prompt", "3"],
            ["data.batch_size x model.sampling.num_samples_per_prompt (8 x 3 = 24 rows)"],
        ),
        (  # TRL's arithmetic: one optimizer step sees mini_batch_size x gradient_accumulation_steps rows
            ["--model.ppo.gradient_accumulation_steps", "3"],
            ["data.batch_size (64)", "model.ppo.gradient_accumulation_steps (32 x 3 = 96)"],
        ),
    ],
)
def test_batch_size_that_the_backward_batch_does_not_divide_exits_2(
    args: list[str],
    named: list[str],
    tiny_assets: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    code, err = run_cli(capsys, monkeypatch, *args, "--trainer.logger.init_args.save_dir", str(tmp_path))
    paragraph = error_paragraph(err, loaded=True)
    assert code == 2 and all(part in paragraph for part in named), paragraph


def test_a_dataset_with_one_usable_prompt_exits_2(
    tiny_assets: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Was `datasets`' train_test_split ValueError: no held-out split, and one text to split."""
    dataset = tmp_path / "one.csv"
    dataset.write_text("text\n" + "the film was a joy from start to end " * 8 + "\n")
    args = ["--data.dataset", str(dataset), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    code, err = run_cli(capsys, monkeypatch, *args)
    paragraph = error_paragraph(err, loaded=True)
    assert code == 2 and "data.dataset=" in paragraph and "data.eval_split" in paragraph


def test_a_held_out_split_without_usable_prompts_is_refused(tmp_path: Path, tiny_assets: Path) -> None:
    long_text = "the movie was great, fun"
    splits = {
        "train": Dataset.from_dict({"text": [long_text] * 8}),
        "test": Dataset.from_dict({"text": ["a"]}),
    }
    DatasetDict(splits).save_to_disk(tmp_path / "no_eval")
    assert "none of the 1 held-out texts" in setup_error(tmp_path / "no_eval")


def test_jsonargparse_type_error_is_one_paragraph(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(capsys, monkeypatch, "--data.batch_size", "abc")
    paragraph = error_paragraph(err)
    assert code == 2 and '"data.batch_size"' in paragraph and "abc" in paragraph and "usage" not in err


TEXTS = ["a great film", "a dull film", "a film"]


# ------------------------------------------------------------------------------------------------
# 5. Huge finite rewards are logged


@pytest.mark.parametrize(
    "reward",
    [[1e30] * 8, [1e20] * 4, [-3e38] * 3, [3.0] * 4, [1e30, -1e30, 2.0], [1e30, 1e30, 1.0]],
    ids=["1e30", "1e20", "-3e38", "constant-3", "huge-spread", "huge-and-small"],
)
def test_training_histograms_of_huge_or_constant_rewards(tmp_path: Path, reward: list[float]) -> None:
    """Was `ValueError: The histogram is empty` from 1e20 up: TensorBoard's default bins end near 1e20."""
    values = torch.tensor(reward)
    writer = SummaryWriter(tmp_path)
    report.log_training_histograms(writer, 0, values, torch.zeros(len(reward)))
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    (logged,) = events.Histograms("histograms/reward")
    histogram = logged.histogram_value
    assert histogram.num == len(reward) and sum(histogram.bucket) == len(reward)  # every value binned
    assert (histogram.min, histogram.max) == (float(values.min()), float(values.max()))


@pytest.mark.parametrize("value", [1e30, 1e20, 3.0])
def test_the_test_picture_of_constant_rewards(value: float) -> None:
    """Was numpy's `Too many bins for data range` for a constant 1e30 reward in `test`."""
    reference, tuned = torch.full((16,), value), torch.full((16,), value)
    figure = report.reward_histogram(reference, tuned, report.compare_rewards(reference, tuned))
    assert [int(patch.get_data().values.sum()) for patch in figure.axes[0].patches] == [16, 16]


# ------------------------------------------------------------------------------------------------
# 6. A reward that returns no scores is named


def function_reward(function: str) -> str:
    reward = {"class_path": "lightning_ppo.rewards.FunctionReward", "init_args": {"function": function}}
    return json.dumps(reward)


def run_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, *args: str
) -> tuple[int, str]:
    """`lightning-ppo COMMAND --config configs/tiny.yaml ARGS` in-process: exit code, last line of stderr."""
    argv = ["lightning-ppo", command, "--config", TINY, *cli_seed_args(), *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_info.value.code, err.splitlines()[-1]


def short_fit(tmp_path: Path) -> list[str]:
    """Arguments of a fit of one PPO step of 8 prompts, without validation, logging under `tmp_path`."""
    return [
        "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.batch_size", "8", "--model.ppo.mini_batch_size", "4",
    ]  # fmt: skip


def test_a_reward_function_returning_strings_exits_2_naming_it(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was `ValueError: too many dimensions 'str'` from torch.as_tensor, naming no reward."""
    reward = f"--model.reward={function_reward('tests.helpers.rewards:labels')}"
    code, line = run_command(capsys, monkeypatch, "fit", *short_fit(tmp_path), reward)
    assert code == 2
    assert line == (
        "lightning-ppo: error: model.reward: the reward function tests.helpers.rewards.labels returned a "
        "list of 8 element(s) for 8 texts (element 0 is str: 'POSITIVE'); it must return one finite float "
        "per text (a list of 8 floats or a float tensor of shape (8,)). Fix the reward."
    )


class ListReward(RewardModel):
    """A reward class that returns a plain list (not the tensor `RewardModel` promises): that is fine."""

    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> list[float]:
        return [0.5] * len(texts)


class TextReward(RewardModel):
    def forward(self, texts: list[str], queries: list[str], responses: list[str]) -> list[str]:
        return list(texts)


@pytest.mark.parametrize(
    ("function", "named"),
    [
        ("nothing_for_the_last", "a list of 3 element(s) for 3 texts (element 2 is NoneType: None)"),
        ("one_short", "a list of 2 element(s) for 3 texts;"),
    ],
)
def test_a_reward_function_returning_none_or_too_few_scores_is_named(function: str, named: str) -> None:
    """Was `TypeError: must be real number, not NoneType`; too few scores a ValueError naming no key."""
    with pytest.raises(ConfigError) as error:
        FunctionReward(f"tests.helpers.rewards:{function}")(TEXTS, TEXTS, TEXTS)
    message = str(error.value)
    assert f"model.reward: the reward function tests.helpers.rewards.{function} returned {named}" in message
    assert "one finite float per text" in message


def test_a_reward_class_returning_texts_is_named_also_inside_a_weighted_sum() -> None:
    samples = SampleBatch(TEXTS, TEXTS, TEXTS, [], [])
    torch.testing.assert_close(call_reward(ListReward(), samples), torch.full((3,), 0.5))
    summed = WeightedSumReward([ListReward(), TextReward()], [1.0, 1.0])
    with pytest.raises(ConfigError, match=rf"the reward {__name__}\.TextReward returned a list of 3 element"):
        summed(TEXTS, TEXTS, TEXTS)
    with pytest.raises(ConfigError, match=r"returned a Tensor of dtype torch.float32 and shape \(3, 1\)"):
        as_scores(torch.zeros(3, 1), 3, "R")


# ------------------------------------------------------------------------------------------------
# 7. Checkpoints load weights-only; a damaged one is named with the checkpoint to use instead


@pytest.fixture(scope="module")
def checkpoint(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last.ckpt of a one-step fit: what this project writes (RNG states, loops, KL controller...)."""
    root = tmp_path_factory.mktemp("fit")
    cli.main(["fit", "--config", TINY, *cli_seed_args(), *short_fit(root)])
    (path,) = root.glob("tiny/version_0/checkpoints/last.ckpt")
    return path


def test_a_real_checkpoint_resumes_and_exports_weights_only(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[object] = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: asked.append(k.get("weights_only")) or load(*a, **k))
    resumed = cli.main(
        ["fit", "--config", TINY, *cli_seed_args(), *short_fit(tmp_path), "--ckpt_path", str(checkpoint),
         "--trainer.limit_train_batches", "2"]
    )  # fmt: skip
    assert resumed.trainer.global_step > 0 and resumed.config.fit.weights_only is True
    assert len(asked) >= 3 and set(asked) == {True}  # our check, Lightning's hparams, the restore
    asked.clear()
    export_command(["--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "export")])
    assert (tmp_path / "export" / "config.json").is_file() and set(asked) == {True}


def damage(path: Path, how: str, good: Path) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    else:  # truncated mid-write, as a full disk or a killed copy leaves it
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "random", "truncated"])
@pytest.mark.parametrize("command", ["fit", "test", "export"])
def test_a_damaged_checkpoint_exits_2_naming_it_and_the_previous_one(
    how: str,
    command: str,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Was a bare `EOFError`, or torch's advice to retry with `weights_only=False` (unsafe)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    previous = folder / "epoch=0-step=8.ckpt"
    previous.write_bytes(checkpoint.read_bytes())
    damaged = folder / "last.ckpt"
    damage(damaged, how, checkpoint)
    if command == "export":
        args = ["lightning-ppo", "export", "--ckpt_path", str(damaged), "--output_dir", str(tmp_path / "out")]
        monkeypatch.setattr(sys, "argv", args)
        with pytest.raises(SystemExit) as exit_info:
            cli.run()
        code, err = exit_info.value.code, capsys.readouterr().err
        assert "Traceback" not in err
        line = err.splitlines()[-1]
    else:
        args = ["--ckpt_path", str(damaged), "--trainer.logger.init_args.save_dir", str(tmp_path)]
        code, line = run_command(capsys, monkeypatch, command, *args)
    assert code == 2
    assert line.startswith(f"lightning-ppo: error: --ckpt_path '{damaged}' cannot be read as a checkpoint: ")
    assert f"e.g. --ckpt_path {previous} " in line and "weights_only=False" not in line
    assert not list(tmp_path.glob("tiny/version_*"))  # stopped before any run started


def test_the_checkpoint_io_names_a_damaged_file_lightning_found_itself(tmp_path: Path) -> None:
    """`--ckpt_path last` resolves inside the Trainer: the plugin that reads it names the file."""
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"last\.ckpt' cannot be read .* it is empty \(0 bytes\)") as error:
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert f"No other checkpoint is in {tmp_path}" in str(error.value)


def test_an_old_checkpoint_with_pickled_options_loads_weights_only(tmp_path: Path) -> None:
    """Checkpoints of lightning-ppo 0.1 pickled PPOConfig (named lightning_ppo.module.PPOConfig)."""
    import lightning_ppo.module  # noqa: F401  (registers the option classes as safe)

    torch.save({"hyper_parameters": {"ppo": PPOConfig(mini_batch_size=8), "shaping": ShapingConfig()}},
               tmp_path / "old.ckpt")  # fmt: skip
    assert read_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]["ppo"].mini_batch_size == 8


def test_a_checkpoint_holding_other_objects_is_refused_not_loaded_unsafely(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "thing": SimpleNamespace(a=1)}, tmp_path / "odd.ckpt")
    with pytest.raises(ConfigError, match=r"holds types\.SimpleNamespace, which loading with weights_only"):
        read_checkpoint(tmp_path / "odd.ckpt")


# ------------------------------------------------------------------------------------------------
# 8. Data files that hold nothing, or are not UTF-8


def data_setup_error(dataset: Path, stage: str = "fit", **options: object) -> str:
    data = PromptDataModule(dataset=str(dataset), tokenizer="tiny:policy", batch_size=8, **options)
    with pytest.raises(ConfigError) as error:
        data.setup(stage)
    return str(error.value)


@pytest.mark.parametrize(
    ("splits", "where"),
    [({"train": []}, "split 'train'"), ({"train": ["a"], "test": []}, "split 'test'"), (None, "its dataset")],
)
def test_an_empty_save_to_disk_dataset_is_named(
    splits: dict[str, list[str]] | None, where: str, tmp_path: Path, tiny_assets: Path
) -> None:
    """Was `IndexError: list index out of range` inside `datasets.load_from_disk`."""
    if splits is None:  # a Dataset, not a DatasetDict
        saved = Dataset.from_dict({"text": []})
    else:
        saved = DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in splits.items()})
    saved.save_to_disk(tmp_path / "saved")
    message = data_setup_error(tmp_path / "saved")
    assert message.startswith(f"data.dataset={str(tmp_path / 'saved')!r}: the `save_to_disk` folder ")
    assert f"{tmp_path / 'saved'} holds 0 rows in {where}; save the texts again" in message


LATIN1_TEXT = "un film très réussi, " * 12  # é and è are one byte each in Latin-1, invalid as UTF-8


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("reviews.csv", f"text\n{LATIN1_TEXT}\n"),
        ("reviews.jsonl", json.dumps({"text": LATIN1_TEXT}, ensure_ascii=False) + "\n"),
        ("reviews.json", json.dumps([{"text": LATIN1_TEXT}], ensure_ascii=False)),
        ("folder/train.csv", f"text\n{LATIN1_TEXT}\n"),
    ],
)
def test_a_data_file_that_is_not_utf8_is_named(
    name: str, content: str, tmp_path: Path, tiny_assets: Path
) -> None:
    """Was a bare `DatasetGenerationError` (CSV, JSON), or JSON lines read as mojibake without a word."""
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content.encode("latin-1"))
    message = data_setup_error(path.parent if name.startswith("folder/") else path, min_text_length=10)
    number, line = next((n, line) for n, line in enumerate(content.splitlines(), 1) if "è" in line)
    where = f"(byte {line.index('è') + 1} of line {number} "  # Latin-1: one byte per character
    assert message.startswith(f"data.dataset: the file {str(path)!r} is not UTF-8 text {where}")
    assert "is 0xe8); it must be UTF-8. Save it again as UTF-8" in message


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_a_predict_file_that_is_not_utf8_is_named(name: str, tmp_path: Path, tiny_assets: Path) -> None:
    """Was a bare `UnicodeDecodeError` naming neither the file nor data.predict_file."""
    path = tmp_path / name
    line = LATIN1_TEXT if name.endswith(".txt") else json.dumps({"prompt": LATIN1_TEXT}, ensure_ascii=False)
    path.write_bytes(line.encode("latin-1") + b"\n")
    message = data_setup_error(tmp_path, "predict", predict_file=str(path))
    assert message.startswith(f"data.predict_file: the file {str(path)!r} is not UTF-8 text (byte ")
    assert "of line 1 is 0xe8); it must be UTF-8" in message


# ------------------------------------------------------------------------------------------------
# 9. Trainer settings that ended inside the training step


def test_a_fit_in_precision_64_true_trains_in_float64(tiny_assets: Path, tmp_path: Path) -> None:
    """Was a dtype mismatch (`scatter(): Expected self.dtype to be equal to src.dtype`) in the backward."""
    fitted = cli.main(
        ["fit", "--config", TINY, *cli_seed_args(), *short_fit(tmp_path), "--trainer.precision", "64-true"]
    )
    assert fitted.trainer.global_step > 0
    assert {p.dtype for p in fitted.model.policy.parameters()} == {torch.float64}


@pytest.mark.parametrize("value", ["0", "-2", "0.0"])
def test_a_val_check_interval_of_zero_exits_2_naming_it(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was `ZeroDivisionError: integer modulo by zero` in Lightning's fit loop, after the models loaded."""
    code, line = run_command(
        capsys, monkeypatch, "fit", *short_fit(tmp_path), "--trainer.val_check_interval", value
    )
    assert code == 2
    assert (
        line == f"lightning-ppo: error: trainer.val_check_interval must be a number > 0 or null, got {value}"
    )


@pytest.mark.parametrize(
    ("name", "content"), [("prompts.txt", ""), ("blank.txt", "\n  \n"), ("prompts.jsonl", "")]
)
def test_predict_on_a_file_without_prompts_exits_2_naming_it(
    name: str,
    content: str,
    tiny_assets: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Was exit 0 with an empty predictions file (.txt), or `datasets`' error on a file without columns."""
    path = tmp_path / name
    path.write_text(content)
    args = ["--data.predict_file", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    code, line = run_command(capsys, monkeypatch, "predict", *args)
    assert code == 2
    assert line.startswith(
        f"lightning-ppo: error: data.predict_file {str(path)!r} holds no prompts, so predict "
    )
    assert not list(tmp_path.glob("tiny/version_*/predictions.jsonl"))


# ------------------------------------------------------------------------------------------------
# 10. A full disk while a checkpoint is written


def test_a_full_disk_while_checkpointing_exits_4_naming_the_intact_checkpoint(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was the right errno (ENOSPC) at the end of a long traceback. The disk 'fills' during the second save:
    its writes start, then fail as a full disk fails them."""
    save = torch.save

    def save_until_full(checkpoint: dict, handle: object, *args: object, **kwargs: object) -> None:
        if checkpoint.get("global_step", 0) < 160:  # the second save: 2 x every_n_train_steps=80
            return save(checkpoint, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04" + bytes(1000))  # a partial write, then no space left
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_full)
    fit = [*short_fit(tmp_path), "--trainer.limit_train_batches", "20"]  # 8 optimizer steps per PPO step
    code, line = run_command(capsys, monkeypatch, "fit", *fit)
    monkeypatch.setattr(torch, "save", save)
    (folder,) = tmp_path.glob("tiny/version_0/checkpoints")
    previous = next(p for p in [folder / "last.ckpt", folder / "epoch=0-step=80.ckpt"] if p.is_file())
    assert code == 4 == cli.DISK_FULL_EXIT_CODE
    assert line.startswith("lightning-ppo: error: disk full while writing the checkpoint ")
    assert f"; the previous checkpoint {previous} is intact. Free space on that disk and resume with " in line
    assert line.endswith(f"--ckpt_path {previous}")
    assert read_checkpoint(previous)["global_step"] == 80
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
