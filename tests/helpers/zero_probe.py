"""A test-only callback: the policy's weights as `test` sees them, gathered whole under ZeRO-3.

Passed on the command line with the checkout on PYTHONPATH: `--trainer.callbacks+={"class_path":
"tests.helpers.zero_probe.TestWeightsProbe", "init_args": {"out_file": FILE}}`; rank 0 writes FILE (a torch
state dict).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_ppo.parallel import whole_parameters


class TestWeightsProbe(Callback):
    def __init__(self, out_file: str) -> None:
        self.out_file = out_file

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with whole_parameters(trainer.strategy, pl_module.policy):  # a collective: every rank enters
            state = {name: tensor.detach().clone() for name, tensor in pl_module.policy.state_dict().items()}
        if trainer.is_global_zero:
            torch.save(state, self.out_file)
