"""Command line: `python -m lightning_ppo {fit,validate,test,predict,export,serve-reward} ...`.

`--help` answers without importing torch; `fit --help` shows every key (`commands.py`). Exit codes: 0 done;
1 Ctrl-C (after saving `last.ckpt`), a remote reward server with no usable scores, or a crash; 2 a
configuration mistake; 3 too many bad (NaN/inf) steps in a row; 4 a full disk while checkpointing;
143 SIGTERM (after saving `last.ckpt`)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING

from lightning_ppo.errors import DiskFullError, RemoteRewardError, config_error_in, error_in

if TYPE_CHECKING:
    from lightning_ppo.commands import PPOCLI

PROG = "python -m lightning_ppo"
COMMANDS = {
    "fit": "tune the policy with PPO (sample, score, update): checkpoints, TensorBoard, export",
    "validate": "held-out reward and KL of the policy (of a checkpoint with --ckpt_path)",
    "test": "reference vs tuned policy on held-out prompts: summary and a per-prompt CSV",
    "predict": "continue the prompts of data.predict_file with the tuned policy, as JSON lines",
    "export": "write a checkpoint's policy as a Hugging Face folder (--ckpt_path, --output_dir, --merge)",
    "serve-reward": "serve a reward over HTTP, for model.reward RemoteReward (--reward, --port)",
}
USAGE = f"""usage: {PROG} {{{",".join(COMMANDS)}}} [--config FILE ...] [--KEY VALUE ...]

PPO fine-tuning of a language model against a reward model, on PyTorch Lightning.

commands:
{chr(10).join(f"  {name:<14}{text}" for name, text in COMMANDS.items())}

examples:
  {PROG} fit --config configs/tiny.yaml        offline CPU demo
  {PROG} fit --config configs/gpt2.yaml        the notebook's task on a GPU
  {PROG} test --config configs/tiny.yaml --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt
  {PROG} export --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt --output_dir tuned
  {PROG} serve-reward --reward lightning_ppo.rewards.ClassifierReward --reward.source MODEL --port 8000
  {PROG} fit --help                            every key of a command, with its default
  {PROG} fit --config configs/tiny.yaml --print_config
"""
CONFIG_ERROR_EXIT_CODE = 2
DISK_FULL_EXIT_CODE = 4


def quiet_libraries() -> None:
    """Silence library chatter that is not about this run: progress bars of datasets and transformers,
    Lightning's tips, DeepSpeed's CPU notice, Lightning's inner deprecations; warnings that matter show."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when `datasets` is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed then picks its CPU accelerator without a warning


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None) -> PPOCLI:
    """Run a LightningCLI command on `args` (default: the process's arguments), libraries quieted."""
    quiet_libraries()  # before the libraries it quiets are imported by the CLI's modules
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_ppo.checkpointing import TERMINATED_EXIT_CODE
    from lightning_ppo.commands import build_cli

    try:
        return build_cli(args, prog=PROG)
    except SIGTERMException:  # Lightning's own SIGTERM stop (before training, or in validate/test/predict)
        raise SystemExit(TERMINATED_EXIT_CODE) from None


def run(args: list[str] | None = None) -> None:
    """The console entry point: a configuration mistake prints one paragraph and exits 2, too many bad
    steps exit 3, a full disk exits 4 naming the intact checkpoint; other exceptions keep their traceback."""
    given = sys.argv[1:] if args is None else args
    if not given or given[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if given else sys.stderr)
        if not given:
            raise SystemExit(CONFIG_ERROR_EXIT_CODE)
        return
    try:
        if given[0] == "export":
            quiet_libraries()
            from lightning_ppo.commands import export_command

            export_command(given[1:], prog=f"{PROG} export")
            return
        if given[0] == "serve-reward":
            quiet_libraries()
            from lightning_ppo.remote import serve_command

            serve_command(given[1:], prog=f"{PROG} serve-reward")
            return
        cli = main(args)
    except Exception as error:
        disk_full = error_in(error, DiskFullError)
        if disk_full is not None:
            print(f"lightning-ppo: error: {disk_full.advice()}", file=sys.stderr)
            raise SystemExit(DISK_FULL_EXIT_CODE) from None
        remote = error_in(error, RemoteRewardError)
        if remote is not None:  # the server's fault, not a bug here: one paragraph, exit 1
            print(
                f"lightning-ppo: error: {remote} The step was not trained; the checkpoints written so far "
                "are intact: resume with --ckpt_path last once the server answers.",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        config_error = config_error_in(error)  # also when jsonargparse wrapped it while building a class
        if config_error is None:
            raise
        print(f"lightning-ppo: error: {config_error}", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    _exit_if_stopped_for_bad_steps(cli)


def _exit_if_stopped_for_bad_steps(cli: PPOCLI) -> None:
    from lightning_ppo.nan_guard import BAD_STEPS_EXIT_CODE

    guard = cli.model.bad_numbers
    if guard.stop_checkpoint is not None:  # every rank exits with the code; rank 0 says why
        if cli.trainer.is_global_zero:
            print(
                f"lightning-ppo: error: stopped after {guard.consecutive_bad_steps} bad steps in "
                f"a row (NaN/inf; see the log above); last good state: {guard.stop_checkpoint}",
                file=sys.stderr,
            )
        raise SystemExit(BAD_STEPS_EXIT_CODE)
