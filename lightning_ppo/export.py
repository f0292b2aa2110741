"""Export the tuned policy as a Hugging Face folder (model + tokenizer), with the value head beside it.

    python -m lightning_ppo export --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt --output_dir tuned

A LoRA policy exports its adapter (`--merge`: also `DIR/merged`), a critic goes to `DIR/critic`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file

from lightning_ppo.lora import save_policy
from lightning_ppo.parallel import consolidate_zero_checkpoint, whole_parameters

VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"


def export_policy(module: LightningModule, output_dir: str | Path, merge: bool = False) -> Path:
    """Write a `PPOModule`'s policy LM, its tokenizer and value head to `output_dir`; returns the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for folder in save_policy(module.policy.lm, output_dir, merge=merge):
        module.tokenizer.save_pretrained(folder)
    if module.policy.v_head is not None:
        save_value_head(module.policy.v_head, output_dir)
    if module.critic is not None:
        module.critic.backbone.save_pretrained(output_dir / "critic")
        save_value_head(module.critic.v_head, output_dir / "critic")
    return output_dir


def save_value_head(head: torch.nn.Linear, folder: Path) -> None:
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    save_file(weights, folder / VALUE_HEAD_WEIGHTS)
    config = {"in_features": head.in_features, "out_features": head.out_features, "input": "last_hidden"}
    (folder / VALUE_HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_value_head(folder: str | Path) -> torch.nn.Linear:
    """The exported value head as an `nn.Linear` (hidden size -> 1)."""
    config = json.loads((Path(folder) / VALUE_HEAD_CONFIG).read_text())
    head = torch.nn.Linear(config["in_features"], config["out_features"])
    head.load_state_dict(load_file(Path(folder) / VALUE_HEAD_WEIGHTS))
    return head


def checkpoint_source(ckpt_path: str | Path) -> str | Path | io.BytesIO:
    """What `load_from_checkpoint` can read: the file, or a DeepSpeed folder (ZeRO-2/3) consolidated."""
    if not Path(ckpt_path).is_dir():
        return ckpt_path
    source = io.BytesIO()
    torch.save(consolidate_zero_checkpoint(ckpt_path), source)
    source.seek(0)
    return source


class ExportOnFitEnd(Callback):
    """At the end of every fit, export the tuned policy to `<log_dir>/export/` (written by rank 0)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        with whole_parameters(trainer.strategy, pl_module):  # ZeRO-3: every rank gathers, rank 0 saves
            if trainer.is_global_zero:
                folder = export_policy(pl_module, Path(log_dir or trainer.default_root_dir) / "export")
                rank_zero_info(f"Exported the tuned policy to {folder}")
