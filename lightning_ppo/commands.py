"""The commands behind `python -m lightning_ppo`: LightningCLI's fit/validate/test/predict, and export.

LightningCLI turns the typed arguments of `PPOModule` and `PromptDataModule` into `model.*` and `data.*`
keys; `--print_config` shows every key with its default. Imported only once a command runs (see `cli.py`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_ppo.checkpointing import LIGHTNING_KEYWORDS, read_checkpoint
from lightning_ppo.data import PromptDataModule
from lightning_ppo.errors import check_number
from lightning_ppo.export import ExportOnFitEnd, checkpoint_source, export_policy
from lightning_ppo.module import PPOModule
from lightning_ppo.parallel import cpu_deepspeed_config, on_cpu
from lightning_ppo.progress_bar import PPOProgressBar
from lightning_ppo.run_folder import acquire, release, remove_temporary_checkpoints


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

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse; then make checkpoint loading weights-only unless `--weights_only false` is given, and
        check a `--ckpt_path` file before Lightning reads its hyper-parameters (a damaged one would end in
        a bare EOFError or UnpicklingError there)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if "weights_only" in config:
            if config.weights_only is None:  # Lightning's None leaves the choice to torch.load
                config.weights_only = True
            ckpt_path = config.get("ckpt_path")
            local = ckpt_path and ckpt_path not in LIGHTNING_KEYWORDS and "://" not in str(ckpt_path)
            if local and not Path(ckpt_path).is_dir():  # a DeepSpeed checkpoint is a folder of shards
                read_checkpoint(ckpt_path, mmap=True, weights_only=config.weights_only)
        # LightningCLI next parses a --ckpt_path file's saved hyper-parameters over model.*; this run's own
        # settings are kept instead, and PPOModule.on_load_checkpoint honours or refuses each change
        # (lightning_ppo.resume)
        self.requested_config = self.config.clone()

    def before_instantiate_classes(self) -> None:
        """Build the data module once before the model: its checks are cheap, the model loads weights."""
        if self.subcommand:  # the settings as requested, not the checkpoint's (see parse_arguments)
            self.config[self.subcommand] = self.requested_config[self.subcommand]
        config = self.config[self.subcommand] if self.subcommand else self.config
        PromptDataModule(**config.data.as_dict())
        # 0 batches between validations ended in a ZeroDivisionError inside Lightning's fit loop
        check_number(
            "trainer.val_check_interval",
            config.trainer.get("val_check_interval"),
            0,
            open_low=True,
            optional=True,
        )
        strategy = cpu_deepspeed_config(config.trainer.get("strategy"))
        if strategy is not None and on_cpu(config.trainer.get("accelerator")):
            # Lightning's DeepSpeedStrategy is CUDA-only; every rank prints this note (a rank is unknown yet)
            print(
                f"lightning-ppo: trainer.strategy {_describe(config.trainer.strategy)} on CPU processes "
                f"runs as {strategy['class_path']} {strategy['init_args'] or ''}".rstrip(),
                file=sys.stderr,
            )
            config.trainer.strategy = Namespace(
                class_path=strategy["class_path"], init_args=Namespace(**strategy["init_args"])
            )
        if config.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
            self.trainer_defaults["callbacks"] = [
                c for c in self.trainer_defaults["callbacks"] if not isinstance(c, PPOProgressBar)
            ]

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """`trainer.fit`, holding the run folder's lock (rank 0): one live fit per folder."""
        if not self.trainer.is_global_zero:
            self.trainer.fit(model, **kwargs)
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        lock = acquire(folder)
        try:
            checkpoint = self.trainer.checkpoint_callback
            dirpath = checkpoint.dirpath if isinstance(checkpoint, ModelCheckpoint) else None
            remove_temporary_checkpoints(dirpath or folder / "checkpoints")
            self.trainer.fit(model, **kwargs)
        finally:
            release(lock)


def _describe(strategy: object) -> str:
    return strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", strategy))


def build_cli(args: list[str] | None, prog: str) -> PPOCLI:
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
        parser_kwargs={"prog": prog},
        seed_everything_default=0,
        trainer_defaults={"callbacks": [PPOProgressBar(), ExportOnFitEnd()]},
        # a requeued SLURM job reuses its log directory: the saved config may be overwritten
        save_config_kwargs={"overwrite": True},
    )


def export_command(args: list[str], prog: str = "python -m lightning_ppo export") -> Path:
    """`python -m lightning_ppo export`: rebuild the module from a checkpoint and export its policy."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write the tuned policy of a checkpoint as a Hugging Face folder.",
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="a checkpoint written by `fit` (last.ckpt; a DeepSpeed folder too)"
    )
    parser.add_argument("--output_dir", required=True, help="folder to write the Hugging Face model into")
    parser.add_argument(
        "--merge", action="store_true", help="LoRA: also write the merged model to DIR/merged"
    )
    parsed = parser.parse_args(args)
    if not Path(parsed.ckpt_path).exists():
        parser.error(f"--ckpt_path {parsed.ckpt_path!r} does not exist")
    if not Path(parsed.ckpt_path).is_dir():  # a damaged or unsafe file: a ConfigError (one paragraph)
        read_checkpoint(parsed.ckpt_path, mmap=True, unsafe_advice="export reads only weights-only ones")
    source = checkpoint_source(parsed.ckpt_path)
    module = PPOModule.load_from_checkpoint(source, map_location="cpu", weights_only=True)
    folder = export_policy(module, parsed.output_dir, merge=parsed.merge)
    print(f"Exported the policy of {parsed.ckpt_path} to {folder}")
    return folder
