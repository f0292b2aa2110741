"""Command line: `python -m lightning_ppo {fit,validate,test,predict} --config configs/tiny.yaml`.

LightningCLI turns the typed arguments of `PPOModule` and `PromptDataModule` into `model.*` and `data.*`
keys; `--print_config` shows every key with its default.
"""

from __future__ import annotations

import sys
import warnings
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import config_error_in
from lightning_ppo.faults import BAD_STEPS_EXIT_CODE
from lightning_ppo.module import PPOModule


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


def main(args: list[str] | None = None) -> PPOCLI:
    # the reference and reward model are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    # PPO checkpoints are meant to hold the state after the step's optimisation
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return PPOCLI(
        PPOModule,
        PromptDataModule,
        args=args,
        parser_class=OneParagraphParser,
        seed_everything_default=0,
        # a requeued SLURM job reuses its log directory: the saved config may be overwritten
        save_config_kwargs={"overwrite": True},
    )


def run() -> None:
    """The console entry point: a configuration mistake prints one paragraph (no traceback) and exits 2.

    A fit stopped for too many bad steps in a row exits 3 (`faults.BAD_STEPS_EXIT_CODE`), after saving its
    checkpoint. Any other exception keeps its traceback: it is a bug or a fault worth reporting.
    """
    try:
        cli = main()
    except Exception as error:
        config_error = config_error_in(error)  # also when jsonargparse wrapped it while building a class
        if config_error is None:
            raise
        print(f"lightning-ppo: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None
    stop_checkpoint = cli.model.faults.stop_checkpoint
    if stop_checkpoint is not None:  # every rank exits with the code; rank 0 says why
        if cli.trainer.is_global_zero:
            print(
                f"lightning-ppo: error: stopped after {cli.model.faults.consecutive_bad_steps} bad steps in "
                f"a row (NaN/inf; see the log above); last good state: {stop_checkpoint}",
                file=sys.stderr,
            )
        raise SystemExit(BAD_STEPS_EXIT_CODE)
