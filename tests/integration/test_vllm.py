"""vLLM as the generation engine (`model.sampling.engine: vllm`), run for real where vLLM imports.

The engine tests carry the `vllm` marker and skip, with the reason, where vllm is not installed
(`bash scripts/install_vllm.sh` in an environment of its own: docs/vllm.md) or the CPU lacks AVX-512:
    . .venv-vllm/bin/activate && python -m pytest -q -m vllm tests/integration/test_vllm.py
The tests of the weights the engine gets and of the errors run everywhere.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lightning_ppo.config import PPOConfig
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import ConfigError
from lightning_ppo.generation import build_engine
from lightning_ppo.lora import LoraOptions, adapter_disabled, apply_lora
from lightning_ppo.models import position_ids_from_mask
from lightning_ppo.module import PPOModule
from lightning_ppo.rollout import SamplingConfig, VLLMOptions, sample_responses
from lightning_ppo.tiny import make_reviews
from lightning_ppo.vllm_engine import _has_avx512, effective_weights
from tests.helpers import (
    RecordingLogger,
    assert_same_greedy_tokens,
    cli_seed_args,
    kept_tokens,
    scalars,
    seeded,
)

ROOT = Path(__file__).parents[2]


def _why_no_vllm() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (bash scripts/install_vllm.sh, docs/vllm.md)"
    if not torch.cuda.is_available() and not _has_avx512():
        return "vLLM's CPU build needs AVX-512 and this CPU has none"
    return None


needs_vllm = pytest.mark.skipif(_why_no_vllm() is not None, reason=_why_no_vllm() or "")

# The engine's float32 log-probs against the trainer's float32 recomputation of the same tokens: measured
# 2e-7 mean and 1.5e-6 largest |difference| on the tiny GPT-2 (other kernels, the same math).
MEAN_TOLERANCE, MAX_TOLERANCE = 1e-5, 1e-4
BATCH, MINI_BATCH, EPOCHS = 8, 4, 2
OPTIMIZER_STEPS_PER_PPO_STEP = EPOCHS * BATCH // MINI_BATCH


def prompts(tokenizer, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded review openings (rows, 8) of 3 to 8 words, the tiny policy's kind of text (EOS pads)."""
    rng = random.Random(seeded(seed))
    texts = make_reviews(rows, rng)["text"]
    ids = torch.full((rows, 8), tokenizer.eos_token_id)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = tokenizer(text)["input_ids"][: rng.randint(3, 8)]
        ids[row, 8 - len(tokens) :], mask[row, 8 - len(tokens) :] = torch.tensor(tokens), 1
    return ids, mask


def trainer_logprobs(lm: torch.nn.Module, rollout, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) of each response token, the trainer's way (a full forward, logits / T). (B, R)"""
    with torch.no_grad():
        logits = lm(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids_from_mask(rollout.attention_mask),
        ).logits[:, rollout.response_start - 1 : -1]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, rollout.response_ids[..., None]).squeeze(-1) * rollout.response_mask


def assert_engine_matches(engine_logprobs: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> None:
    diff = (engine_logprobs - trainer).abs() * mask
    assert float(diff.sum() / mask.sum()) < MEAN_TOLERANCE and float(diff.max()) < MAX_TOLERANCE, diff.max()


@pytest.fixture(scope="module")
def tokenizer(tiny_assets: Path):
    return AutoTokenizer.from_pretrained(tiny_assets / "policy")


@pytest.fixture(scope="module")
def lm(tiny_assets: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").eval()


@pytest.fixture(scope="module")
def engine(lm: torch.nn.Module):
    """One engine for the module's engine-level tests (building one costs seconds)."""
    eos = lm.config.eos_token_id
    return build_engine(SamplingConfig(engine="vllm", vllm=VLLMOptions(cpu_kv_cache_gib=0.5)), lm, eos, eos)


# ---------------------------------------------------------------------------------------------------
# The engine itself


@pytest.mark.vllm
@needs_vllm
def test_greedy_output_equals_the_decoding_loops() -> None:
    """On a random GPT-2 (the tiny policy's greedy choice is EOS at once); an untied, wide-init head so
    greedy continuations vary, EOS (token 0) now and then."""
    torch.manual_seed(seeded(7))
    config = GPT2Config(
        vocab_size=300, n_layer=2, n_embd=64, n_head=2, n_positions=64, eos_token_id=0,
        tie_word_embeddings=False, initializer_range=0.5,
    )  # fmt: skip
    lm = GPT2LMHeadModel(config).eval()
    engine = build_engine(SamplingConfig(engine="vllm", vllm=VLLMOptions(cpu_kv_cache_gib=0.25)), lm, 0, 0)
    ids = torch.randint(1, 300, (16, 6))
    mask = (torch.arange(6) >= torch.randint(0, 4, (16, 1))).long()  # (16, 6) 2 to 6 prompt tokens
    lengths = torch.randint(4, 25, (16,))
    sampling = SamplingConfig(top_k=1, response_max_length=24)
    ours = engine.sample(lm, ids, mask, lengths, sampling)
    loop = sample_responses(lm, ids, mask, lengths, sampling, pad_token_id=0, eos_token_id=0)
    # a near-tie (top-2 margin < NEAR_TIE) may be decided either way by two kernel paths
    assert_same_greedy_tokens(lm, loop, kept_tokens(ours))
    assert ours.response_mask.sum() > 4 * 16  # real continuations, not an EOS at once
    assert ours.decoded_positions == ours.useful_positions == int(ours.response_mask.sum())


@pytest.mark.vllm
@needs_vllm
def test_building_an_engine_keeps_the_trainers_random_streams(lm) -> None:
    """vLLM seeds the global RNGs of its process; the trainer's draws must go on as if it had not."""
    torch.manual_seed(seeded(3))
    random.seed(seeded(3))
    expected = torch.rand(3), random.random()
    torch.manual_seed(seeded(3))
    random.seed(seeded(3))
    build_engine(SamplingConfig(engine="vllm", vllm=VLLMOptions(cpu_kv_cache_gib=0.25)), lm, 0, 0)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


@pytest.mark.vllm
@needs_vllm
def test_engine_logprobs_are_the_trainers_at_a_temperature(lm, tokenizer, engine) -> None:
    """vLLM's processed log-probs (logits / T, then softmax) are what the trainer recomputes."""
    ids, mask = prompts(tokenizer, 8, seed=1)
    rollout = engine.sample(lm, ids, mask, torch.full((8,), 12), SamplingConfig(temperature=0.7))
    assert rollout.sampling_logprobs is not None
    assert_engine_matches(
        rollout.sampling_logprobs, trainer_logprobs(lm, rollout, 0.7), rollout.response_mask
    )
    assert (rollout.sampling_logprobs * (1 - rollout.response_mask)).abs().sum() == 0


@pytest.mark.vllm
@needs_vllm
def test_k_samples_of_a_prompt_differ_and_a_seed_repeats_them(lm, tokenizer, engine) -> None:
    ids, mask = prompts(tokenizer, 2, seed=2)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # 2 prompts x k = 4
    lengths = torch.full((8,), 12)
    torch.manual_seed(seeded(5))
    first = engine.sample(lm, ids, mask, lengths, SamplingConfig())
    torch.manual_seed(seeded(5))
    again = engine.sample(lm, ids, mask, lengths, SamplingConfig())
    torch.testing.assert_close(first.input_ids, again.input_ids, rtol=0, atol=0)
    for group in kept_tokens(first)[:4], kept_tokens(first)[4:]:
        assert len({tuple(tokens) for tokens in group}) > 1, group


@pytest.mark.vllm
@needs_vllm
def test_the_engine_samples_from_whichever_model_asks(lm, tokenizer, engine) -> None:
    """The frozen reference, then the policy again: each time the asking model's weights are loaded."""
    other = copy.deepcopy(lm)
    with torch.no_grad():
        for weight in other.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    ids, mask = prompts(tokenizer, 8, seed=3)
    for model in (other, lm, other):
        rollout = engine.sample(model, ids, mask, torch.full((8,), 10), SamplingConfig())
        assert_engine_matches(
            rollout.sampling_logprobs, trainer_logprobs(model, rollout), rollout.response_mask
        )


@pytest.mark.vllm
@needs_vllm
def test_rollouts_past_one_prefill_batch_or_the_kv_cache_still_sample(lm) -> None:
    """Seeded requests whose prefill vLLM would split (after the tests of the shared engine: a dropped
    engine tears down vLLM's process groups): 128 prompts of 40 tokens (over 4,096 in one step),
    and 64 rows of 64 tokens, more than a KV cache of 1,024 tokens holds (vLLM preempts rows)."""
    eos = lm.config.eos_token_id
    bytes_per_token = 2 * lm.config.n_layer * lm.config.n_embd * 4  # keys and values, float32
    for rows, width, length, options in [
        (128, 40, 2, VLLMOptions(cpu_kv_cache_gib=0.5)),
        (64, 8, 56, VLLMOptions(cpu_kv_cache_gib=1024 * bytes_per_token / 2**30, max_model_len=64)),
    ]:
        config = SamplingConfig(engine="vllm", vllm=options)
        ids = torch.randint(
            1, lm.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(6)
        )
        rollout = build_engine(config, lm, eos, eos).sample(
            lm, ids, torch.ones_like(ids), torch.full((rows,), length), config
        )
        assert rollout.response_ids.shape == (rows, length)
        assert rollout.response_mask.sum() > 0


# ---------------------------------------------------------------------------------------------------
# In the trainer: sync after every PPO step and on resume, the mismatch metric


def make_module(**sampling) -> PPOModule:
    return PPOModule(
        policy="tiny:policy",
        reward_model="tiny:reward",
        learning_rate=1e-3,
        ppo=PPOConfig(ppo_epochs=EPOCHS, mini_batch_size=MINI_BATCH, init_kl_coef=0.05),
        sampling=SamplingConfig(response_min_length=4, response_max_length=8, engine="vllm", **sampling),
        log_samples_every_n_steps=0,
    )


def fit(module: PPOModule, root: Path, steps: int, ckpt_path: Path | None = None) -> RecordingLogger:
    """`steps` PPO steps on the tiny reviews, a checkpoint after each (`root/epoch=0-step=N.ckpt`)."""
    logger = RecordingLogger()
    every = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=OPTIMIZER_STEPS_PER_PPO_STEP)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[every],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    data = PromptDataModule(dataset="tiny:reviews", tokenizer="tiny:policy", batch_size=BATCH, val_size=BATCH)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return logger


def sequence_logprobs(module: PPOModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's and the trainer's log-probs of one fixed sequence, the engine synced by a sample."""
    lm, engine = module.policy.lm, module.engine
    ids, mask = prompts(module.tokenizer, 1, seed=4)
    engine.sample(lm, ids, mask, torch.tensor([2]), module.sampling)
    sequence = torch.arange(2, 34)[None]  # (1, 32)
    params = engine._sampling_params(max_tokens=1, prompt_logprobs=0, detokenize=False)
    [out] = engine.llm.generate([{"prompt_token_ids": sequence[0].tolist()}], params, use_tqdm=False)
    tokens = sequence[0, 1:].tolist()
    ours = torch.tensor(
        [step[token].logprob for token, step in zip(tokens, out.prompt_logprobs[1:], strict=True)]
    )
    with torch.no_grad():
        logits = lm(input_ids=sequence).logits[0, :-1].float()  # (31, V)
    return ours, torch.log_softmax(logits, -1).gather(-1, sequence[0, 1:, None]).squeeze(-1)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_after_a_ppo_step_the_engine_samples_the_updated_weights(tiny_assets: Path, tmp_path: Path) -> None:
    module = make_module()
    engine_before, trainer_before = sequence_logprobs(module)
    torch.testing.assert_close(engine_before, trainer_before, rtol=0, atol=MAX_TOLERANCE)
    logged = fit(module, tmp_path, steps=2)
    # the second step samples after the first one's optimizer steps: a stale engine would show there
    assert max(logged.metrics["rollout/logprob_diff"]) < MEAN_TOLERANCE, logged.metrics[
        "rollout/logprob_diff"
    ]
    assert max(logged.metrics["rollout/logprob_diff_max"]) < MAX_TOLERANCE
    engine_after, trainer_after = sequence_logprobs(module)
    torch.testing.assert_close(engine_after, trainer_after, rtol=0, atol=MAX_TOLERANCE)
    assert float((engine_after - engine_before).abs().max()) > 100 * MAX_TOLERANCE  # the weights moved


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_a_resumed_fit_syncs_the_restored_weights(tiny_assets: Path, tmp_path: Path) -> None:
    fit(make_module(), tmp_path / "first", steps=2)
    module = make_module()
    engine_start, _ = sequence_logprobs(module)  # the engine now holds the starting weights
    first_step = tmp_path / "first" / f"epoch=0-step={OPTIMIZER_STEPS_PER_PPO_STEP}.ckpt"
    logged = fit(module, tmp_path / "resumed", steps=2, ckpt_path=first_step)
    assert len(logged.metrics["rollout/logprob_diff"]) == 1  # step 2 only
    assert logged.metrics["rollout/logprob_diff"][0] < MEAN_TOLERANCE
    engine_after, trainer_after = sequence_logprobs(module)
    torch.testing.assert_close(engine_after, trainer_after, rtol=0, atol=MAX_TOLERANCE)
    assert float((engine_after - engine_start).abs().max()) > 100 * MAX_TOLERANCE


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_a_lora_policy_samples_its_merged_weights_untouched(tiny_assets: Path, tmp_path: Path) -> None:
    module = PPOModule(
        policy="tiny:policy",
        reward_model="tiny:reward",
        learning_rate=1e-2,
        ppo=PPOConfig(ppo_epochs=EPOCHS, mini_batch_size=MINI_BATCH, init_kl_coef=0.05),
        sampling=SamplingConfig(response_min_length=4, response_max_length=8, engine="vllm"),
        lora=LoraOptions(),
        log_samples_every_n_steps=0,
    )
    logged = fit(module, tmp_path, steps=2)
    assert max(logged.metrics["rollout/logprob_diff"]) < MEAN_TOLERANCE
    engine_after, trainer_after = sequence_logprobs(module)
    torch.testing.assert_close(engine_after, trainer_after, rtol=0, atol=MAX_TOLERANCE)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_a_ddp_fit_builds_one_engine_per_rank(tiny_assets: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "lightning_ppo", "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
        "--model.sampling.engine", "vllm", "--model.sampling.vllm.cpu_kv_cache_gib", "0.5",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", "runs",
        "--data.batch_size", "16", "--data.val_size", "16", "--model.ppo.mini_batch_size", "8",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # Lightning splits the cores between the ranks
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    engines = set(re.findall(r"pid=(\d+)\) INFO .* init engine", result.stdout + result.stderr))
    assert len(engines) == 2, engines  # one engine in each rank's process

    logged = scalars(tmp_path / "runs" / "tiny" / "version_0")
    assert len(logged["rollout/logprob_diff"]) == 2
    assert max(logged["rollout/logprob_diff"]) < MEAN_TOLERANCE
    assert max(logged["rollout/logprob_diff_max"]) < MAX_TOLERANCE
    assert "val/reward_mean" in logged


# ---------------------------------------------------------------------------------------------------
# Everywhere: the weights the engine gets, and the errors


def test_lora_weights_are_merged_without_touching_the_model(lm: torch.nn.Module) -> None:
    policy = apply_lora(copy.deepcopy(lm), LoraOptions())
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)  # as after training: B starts at 0
    before = {name: weight.clone() for name, weight in policy.state_dict().items()}
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    ours = dict(effective_weights(policy))
    assert ours.keys() == merged.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-6, msg=name)
    with adapter_disabled(policy):
        for name, weight in effective_weights(policy):
            torch.testing.assert_close(weight, lm.state_dict()[name], rtol=0, atol=0, msg=name)
    for name, weight in policy.state_dict().items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=0, msg=name)


def test_a_missing_vllm_names_the_key_and_the_install_script(lm, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setattr("lightning_ppo.vllm_engine._has_avx512", lambda: True)
    with pytest.raises(ConfigError, match="model.sampling.engine is vllm.*scripts/install_vllm.sh"):
        build_engine(SamplingConfig(engine="vllm"), lm, 0, 0)


def test_a_cpu_without_avx512_names_the_key(lm, monkeypatch) -> None:
    monkeypatch.setattr("lightning_ppo.vllm_engine._has_avx512", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with pytest.raises(ConfigError, match="model.sampling.engine is vllm.*AVX-512.*engine: loop"):
        build_engine(SamplingConfig(engine="vllm"), lm, 0, 0)


def test_the_old_decoder_key_names_the_engine_key() -> None:
    with pytest.raises(ConfigError, match="model.sampling.decoder was renamed.*`engine: vllm`"):
        SamplingConfig(decoder="vllm")
