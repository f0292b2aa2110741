"""LoRA policy: adapter-free reference, only adapter + value head train and are checkpointed, still learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lightning_ppo.cli import main
from lightning_ppo.lora import LoraOptions, adapts_tied_output_layer, apply_lora, save_policy
from lightning_ppo.models import freeze, load_causal_lm, response_logits
from lightning_ppo.module import PPOModule
from tests.helpers import TINY, cli_seed_args, reward_trend, scalars

LORA_STEPS = 24
LORA_LR = "3e-3"


def _batch(module: PPOModule) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = module.tokenizer(["the movie was", "this film is really"], return_tensors="pt", padding=True)
    return encoded.input_ids, encoded.attention_mask  # (B, P) left-padded


def test_reference_is_the_base_model_with_the_adapter_off(tiny_assets: Path):
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward", lora=LoraOptions(r=4))
    assert module.ref_policy is None  # no second copy of the model
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero
        for name, param in module.policy.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    input_ids, mask = _batch(module)
    base = freeze(load_causal_lm("tiny:policy"))  # frozen as the full-fine-tuning reference is
    with torch.no_grad():
        expected, expected_hidden = response_logits(base, input_ids, mask, 2)
        with module.models.reference_lm() as reference:
            ref_logits, ref_hidden = response_logits(reference, input_ids, mask, 2)
        policy_logits, _ = module.policy(input_ids, mask, 2)
    torch.testing.assert_close(ref_hidden, expected_hidden, rtol=0, atol=0)
    torch.testing.assert_close(ref_logits, expected, rtol=0, atol=0)
    assert not torch.allclose(policy_logits, expected, atol=1e-3)  # the adapter is on outside the context


def test_optimizer_holds_only_adapter_and_value_head(tiny_assets: Path):
    module = PPOModule(policy="tiny:policy", reward_model="tiny:reward", lora=LoraOptions(r=4))
    optimised = [p for group in module.configure_optimizers().param_groups for p in group["params"]]
    names = {n for n, p in module.named_parameters() if any(p is q for q in optimised)}
    assert names and all("lora_" in n or n.startswith("policy.v_head.") for n in names), names


@pytest.fixture(scope="module")
def lora_fit(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora_fit")
    cli = main(
        [
            "fit", "--config", TINY, *cli_seed_args(), "--trainer.max_epochs", "1",
            "--model.lora.r", "8", "--model.learning_rate", LORA_LR,
            "--trainer.limit_train_batches", str(LORA_STEPS), "--trainer.val_check_interval", str(LORA_STEPS),
            "--trainer.logger.init_args.save_dir", str(root),
        ]
    )  # fmt: skip
    return cli, Path(cli.trainer.log_dir)


@pytest.mark.slow
def test_tiny_config_trains_the_adapter_with_lora_and_the_base_stays_frozen(lora_fit, tiny_assets: Path):
    cli, log_dir = lora_fit
    # LoRA learns the tiny demo slowly: over 24 steps the trend's t was 0.3-4.5 across tiny seeds 0-2 (full
    # fine-tuning: 8-11), too weak to assert a rise at 1e-4; a fall would be a bug at the same rate
    t, threshold = reward_trend(scalars(log_dir))
    assert t > -threshold, t

    start = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").state_dict()
    lm = cli.model.policy.lm
    base = lm.get_base_model().state_dict()
    for name, weight in start.items():  # peft renames adapted layers' weights to `<layer>.base_layer.*`
        layer, _, kind = name.rpartition(".")
        tuned = base[name] if name in base else base[f"{layer}.base_layer.{kind}"]
        torch.testing.assert_close(tuned, weight, rtol=0, atol=0)
    adapters = [p for n, p in lm.named_parameters() if "lora_B" in n]
    assert adapters and any(p.abs().sum() > 0 for p in adapters)  # lora_B starts at 0: it moved


@pytest.mark.slow
def test_lora_checkpoint_holds_only_trainable_weights_and_loads_strictly(lora_fit, tmp_path: Path):
    cli, _ = lora_fit
    path = tmp_path / "final.ckpt"  # last.ckpt is from the last ModelCheckpoint save, not the end
    cli.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys and all("lora_" in k or k.startswith("policy.v_head.") for k in keys), keys
    fresh = PPOModule(policy="tiny:policy", reward_model="tiny:reward", lora=LoraOptions(r=8))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    tuned = cli.model.state_dict()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, tuned[key], rtol=0, atol=0)

    # through the CLI: strict loading, and `test` samples the reference with the adapter off
    tested = main(
        [
            "test", "--config", TINY, *cli_seed_args(), "--model.lora.r", "8", "--ckpt_path", str(path),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    loaded = tested.model.state_dict()
    for key in keys:  # the CLI loaded the tuned adapter and value head
        torch.testing.assert_close(loaded[key], tuned[key], rtol=0, atol=0)
    input_ids, mask = _batch(tested.model)
    base = freeze(load_causal_lm("tiny:policy"))
    with torch.no_grad():
        expected, _ = response_logits(base, input_ids, mask, 2)
        with tested.model.models.reference_lm() as reference:
            ref_logits, _ = response_logits(reference, input_ids, mask, 2)
        policy_logits, _ = tested.model.policy(input_ids, mask, 2)
    torch.testing.assert_close(ref_logits, expected, rtol=0, atol=0)  # what `test` sampled as the reference
    assert not torch.allclose(policy_logits, expected, atol=1e-3)
    metrics = tested.trainer.callback_metrics
    assert all(torch.isfinite(metrics[f"test/reward_{side}_mean"]) for side in ("policy", "ref"))


@pytest.mark.slow
def test_save_policy_writes_the_adapter_and_the_merged_model(lora_fit, tmp_path: Path):
    cli, _ = lora_fit
    lm = cli.model.policy.lm
    written = save_policy(lm, tmp_path / "export", merge=True)
    assert written == [tmp_path / "export", tmp_path / "export" / "merged"]
    assert (tmp_path / "export" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged").eval()
    input_ids, mask = _batch(cli.model)
    with torch.no_grad():
        expected, _ = response_logits(lm, input_ids, mask, 2)
        got, _ = response_logits(merged, input_ids, mask, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert any("lora_" in n for n, _ in lm.named_parameters())  # the training model kept its adapter


def test_the_memory_benchmark_counts_what_lora_saves():
    from benchmarks.lora_memory import MIB, measure

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    full, lora = measure(None, config), measure(LoraOptions(r=2), config)
    assert full["trainable parameters"] == full["all parameters"]
    assert 0 < lora["trainable parameters"] < full["trainable parameters"] / 4
    # Adam keeps two float32 moments per trainable weight; LoRA holds no reference copy
    for setup in (full, lora):
        assert setup["Adam state MiB"] * MIB >= 2 * 4 * setup["trainable parameters"]
    value_head = config.n_embd + 1
    assert full["reference copy MiB"] * MIB >= 4 * (full["all parameters"] - value_head)
    assert lora["reference copy MiB"] == 0


def test_merging_an_adapter_on_a_tied_output_layer_is_refused(tiny_assets: Path, tmp_path: Path):
    tied = apply_lora(load_causal_lm("tiny:policy"), LoraOptions(r=2, target_modules=["c_attn", "lm_head"]))
    assert adapts_tied_output_layer(tied)
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules"):
        save_policy(tied, tmp_path / "merged", merge=True)
    assert save_policy(tied, tmp_path / "adapter") == [tmp_path / "adapter"]  # the adapter alone is fine
    assert not adapts_tied_output_layer(apply_lora(load_causal_lm("tiny:policy"), LoraOptions(r=2)))
