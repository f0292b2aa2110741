"""Export: every fit leaves a Hugging Face folder of the policy; so does a command, from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from lightning_ppo.cli import main
from lightning_ppo.commands import export_command
from lightning_ppo.export import export_policy, load_value_head
from lightning_ppo.lora import LoraOptions
from lightning_ppo.module import PPOModule
from tests.helpers import cli_seed_args, seeded

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three tiny PPO steps; returns the CLI object (its module is the trained one) and the log folder."""
    root = tmp_path_factory.mktemp("export_fit")
    cli = main(
        [
            "fit", "--config", TINY, *cli_seed_args(),
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3",
            # a checkpoint after PPO step 2 (16 optimizer steps), none after step 3: last.ckpt must be redone
            "--trainer.callbacks.init_args.every_n_train_steps", "16",
            "--trainer.limit_val_batches", "0",
            "--data.batch_size", "16",
            "--model.ppo.mini_batch_size", "8",
            "--trainer.logger.init_args.save_dir", str(root),
        ]
    )  # fmt: skip
    return cli, Path(cli.trainer.log_dir)


def assert_matches_module(folder: Path, module) -> None:
    """The folder's model gives the module's policy logits, and its value head is the module's."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(["the movie was great", "this film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = module.policy.lm.eval()(**ids).logits
        # float32 noise only: the module's policy runs torch's fused tanh-GELU (`models.use_fused_gelu`)
        torch.testing.assert_close(model(**ids).logits, expected, rtol=1e-6, atol=1e-6)
    head = load_value_head(folder)
    torch.testing.assert_close(head.weight, module.policy.v_head.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(head.bias, module.policy.v_head.bias.detach(), rtol=0, atol=0)


def test_fit_ends_with_an_export_of_the_tuned_policy(fitted, tiny_assets: Path):
    cli, log_dir = fitted
    folder = log_dir / "export"
    assert_matches_module(folder, cli.model)
    start = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy").state_dict()
    exported = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert any(not torch.equal(exported[name], weight) for name, weight in start.items()), "not tuned"

    generate = pipeline("text-generation", model=str(folder), device="cpu")
    # min_new_tokens: a briefly tuned policy may put EOS first (the greedy pick at P = 0.04 in one run)
    text = generate("the movie was", min_new_tokens=5, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the movie was") and len(text) > len("the movie was")


def test_the_export_command_rebuilds_the_policy_from_a_checkpoint(fitted, tmp_path: Path):
    cli, log_dir = fitted
    assert torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24
    folder = export_command(
        ["--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt"), "--output_dir", str(tmp_path / "out")]
    )
    assert_matches_module(folder, cli.model)


def test_the_export_command_names_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        export_command(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--output_dir", str(tmp_path / "out")])
    assert "--ckpt_path" in capsys.readouterr().err


def test_export_writes_a_lora_adapter_and_a_separate_critic(tiny_assets: Path, tmp_path: Path):
    torch.manual_seed(seeded(0))
    module = PPOModule(
        policy="tiny:policy", reward_model="tiny:reward", lora=LoraOptions(r=4), critic="tiny:policy"
    )
    with torch.no_grad():  # move the adapter away from its zero init, so the export has something to carry
        for name, weight in module.policy.lm.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)
    folder = export_policy(module, tmp_path / "export", merge=True)

    assert (folder / "adapter_config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not (folder / "value_head.safetensors").exists()  # the values come from the critic
    input_ids = torch.randint(0, module.policy.lm.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = module.policy.lm(input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_assets / "policy")
        adapted = PeftModel.from_pretrained(base, folder).eval()
        torch.testing.assert_close(adapted(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)

    critic = folder / "critic"
    assert (critic / "config.json").is_file()
    head = load_value_head(critic)
    torch.testing.assert_close(head.weight, module.critic.v_head.weight.detach())
