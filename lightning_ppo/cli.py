"""Command line: `python -m lightning_ppo {fit,validate,test,predict} --config configs/tiny.yaml`.

LightningCLI turns the typed arguments of `PPOModule` and `PromptDataModule` into `model.*` and `data.*`
keys; `--print_config` shows every key with its default.
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import config_error_in
from lightning_ppo.module import PPOModule


class PPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # prompts are tokenised with the policy's tokenizer
        parser.link_arguments("model.policy", "data.tokenizer")


def main(args: list[str] | None = None) -> PPOCLI:
    # the reference and reward model are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    # PPO checkpoints are meant to hold the state after the step's optimisation
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return PPOCLI(
        PPOModule,
        PromptDataModule,
        args=args,
        seed_everything_default=0,
        # a requeued SLURM job reuses its log directory: the saved config may be overwritten
        save_config_kwargs={"overwrite": True},
    )


def run() -> None:
    """The console entry point: a configuration mistake prints one paragraph (no traceback) and exits 2.

    Any other exception keeps its traceback: it is a bug or a fault worth reporting.
    """
    try:
        main()
    except Exception as error:
        config_error = config_error_in(error)  # also when jsonargparse wrapped it while building a class
        if config_error is None:
            raise
        print(f"lightning-ppo: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None
