"""Command line: `python -m lightning_ppo {fit,validate,test,predict} --config configs/tiny.yaml`.

`python -m lightning_ppo --help` lists the commands without importing torch or Lightning (it answers at
once); `python -m lightning_ppo fit --help` and `--print_config` show every `model.*`/`data.*`/`trainer.*`
key with its default, through LightningCLI, which turns the typed arguments of `PPOModule` and
`PromptDataModule` into those keys.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING

from lightning_ppo.errors import config_error_in

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

PROG = "python -m lightning_ppo"
COMMANDS = {
    "fit": "tune the policy with PPO (sample, score, update): checkpoints, TensorBoard, export",
    "validate": "held-out reward and KL of the policy (of a checkpoint with --ckpt_path)",
    "test": "reference vs tuned policy on held-out prompts: summary and a per-prompt CSV",
    "predict": "continue the prompts of data.predict_file with the tuned policy, as JSON lines",
}
USAGE = f"""usage: {PROG} {{{",".join(COMMANDS)}}} [--config FILE ...] [--KEY VALUE ...]

PPO fine-tuning of a language model against a reward model, on PyTorch Lightning.

commands:
{chr(10).join(f"  {name:<10}{text}" for name, text in COMMANDS.items())}

examples:
  {PROG} fit --config configs/tiny.yaml        offline CPU demo
  {PROG} fit --config configs/gpt2.yaml        the notebook's task on a GPU
  {PROG} test --config configs/tiny.yaml --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt
  {PROG} fit --help                            every key of a command, with its default
  {PROG} fit --config configs/tiny.yaml --print_config
"""


def quiet_libraries() -> None:
    """Silence the libraries' chatter that is not about this run; warnings that matter still show.

    Off: `datasets`' Map/Filter/Saving bars, transformers' weight-loading bars, Lightning's advertising
    tips, DeepSpeed's "Setting accelerator to CPU" notice on machines without a GPU, and deprecation
    warnings raised inside Lightning (e.g. torch's LeafSpec), which a user of this trainer cannot act on.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when `datasets` is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed then picks its CPU accelerator without a warning


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI on `args` (default: the process's arguments)."""
    quiet_libraries()  # before the libraries it quiets are imported
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from lightning_ppo.callbacks import PPOProgressBar
    from lightning_ppo.data import PromptDataModule
    from lightning_ppo.module import PPOModule

    class PPOCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            # prompts are tokenised with the policy's tokenizer
            parser.link_arguments("model.policy", "data.tokenizer")

    # the reference and reward model are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    # PPO checkpoints are meant to hold the state after the step's optimisation
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    return PPOCLI(
        PPOModule,
        PromptDataModule,
        args=args,
        seed_everything_default=0,
        parser_kwargs={"prog": PROG},
        trainer_defaults={"callbacks": [PPOProgressBar()]},
        # a requeued SLURM job reuses its log directory: the saved config may be overwritten
        save_config_kwargs={"overwrite": True},
    )


def run(args: list[str] | None = None) -> None:
    """The console entry point: a configuration mistake prints one paragraph (no traceback) and exits 2.

    Any other exception keeps its traceback: it is a bug or a fault worth reporting.
    """
    given = sys.argv[1:] if args is None else args
    if not given or given[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if given else sys.stderr)
        if not given:
            raise SystemExit(2)
        return
    try:
        main(args)
    except Exception as error:
        config_error = config_error_in(error)  # also when jsonargparse wrapped it while building a class
        if config_error is None:
            raise
        print(f"lightning-ppo: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None
