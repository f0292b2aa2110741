"""The LightningCLI behind `python -m lightning_ppo {fit,validate,test,predict}`: keys, links, callbacks.

LightningCLI turns the typed arguments of `PPOModule` and `PromptDataModule` into `model.*` and `data.*`
keys; `--print_config` shows every key with its default. Imported only once a command runs (see `cli.py`).
"""

from __future__ import annotations

import sys
import warnings
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_ppo.callbacks import PPOProgressBar
from lightning_ppo.data import PromptDataModule
from lightning_ppo.module import PPOModule

PROG = "python -m lightning_ppo"


class OneParagraphParser(LightningArgumentParser):
    """Parse errors (unknown key, wrong type) print one paragraph and exit 2, without the long usage text."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse raises an ArgumentError then
            super().error(message, ex)
        print(f"lightning-ppo: error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        self.exit(2)


class PPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # prompts are tokenised with the policy's tokenizer
        parser.link_arguments("model.policy", "data.tokenizer")

    def before_instantiate_classes(self) -> None:
        """Build the data module once before the model: its checks are cheap, the model loads weights."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        PromptDataModule(**config.data.as_dict())


def build_cli(args: list[str] | None = None) -> PPOCLI:
    """Parse `args` (default: the process's arguments), build the classes and run the command."""
    # the reference and reward model are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    # PPO checkpoints are meant to hold the state after the step's optimisation
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return PPOCLI(
        PPOModule,
        PromptDataModule,
        args=args,
        parser_class=OneParagraphParser,
        parser_kwargs={"prog": PROG},
        seed_everything_default=0,
        trainer_defaults={"callbacks": [PPOProgressBar()]},
        # a requeued SLURM job reuses its log directory: the saved config may be overwritten
        save_config_kwargs={"overwrite": True},
    )
