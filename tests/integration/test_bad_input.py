"""Every input mistake a user can make fails with a message that names the key or file and says what to do."""

from __future__ import annotations

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
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from lightning_ppo import cli
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.models import load_causal_lm, load_tokenizer
from lightning_ppo.module import PPOModule
from lightning_ppo.rewards import ClassifierReward, score_rollout
from lightning_ppo.rollout import SamplingConfig, sample_responses
from lightning_ppo.tiny import MAX_POSITIONS
from tests.helpers import cli_seed_args, seeded

ROOT = Path(__file__).parents[1]
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
