"""A test-only callback that records what one rank saw and did, for tests that run the real CLI.

Passed on the command line, with the checkout on PYTHONPATH: `--trainer.callbacks+={"class_path":
"tests.helpers.probes.RankProbe", "init_args": {"out_dir": DIR}}`. At the end of `fit` each rank writes
`DIR/rank<N>.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

import lightning_ppo.module as module_file
from lightning_ppo import evaluation, update
from lightning_ppo.compat import cluster_environment
from lightning_ppo.core import logprobs_from_logits


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class RankProbe(Callback):
    """Per step: prompts, local scores, KL coefficient, first-minibatch log-prob gap; counts all-reduces."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {
            "queries": [],
            "train_scores": [],
            "val_scores": [],
            "kl_coef": [],
            "first_minibatch_gap": [],
            "logit_dtypes": [],
            "logprob_dtypes": [],
            "allreduces": 0,
            "response_lengths": [],
        }
        self._first_loss_done = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["start_hash"] = weights_hash(pl_module.policy)
        self.record["num_threads"] = torch.get_num_threads()
        self.record["world_size"] = trainer.world_size
        self.record["global_rank"] = trainer.global_rank
        self.record["cluster_environment"] = type(cluster_environment(trainer)).__name__
        if isinstance(trainer.model, DistributedDataParallel):
            trainer.model.register_comm_hook(None, self._counting_allreduce)
        score, ppo_loss = module_file.score_rollout, update.ppo_loss

        def recording_score(reward, tokenizer, rollout, batch):
            scores, samples = score(reward, tokenizer, rollout, batch)
            key = "train_scores" if trainer.training else "val_scores"
            self.record[key].append(scores.tolist())
            if trainer.training:
                self.record["response_lengths"].append(rollout.response_mask.sum(-1).tolist())
            return scores, samples

        def recording_ppo_loss(models, batch, config):
            if not self._first_loss_done:  # before any optimizer step of this PPO step
                self._first_loss_done = True
                with torch.no_grad():
                    logits, _ = pl_module.policy(batch.input_ids, batch.attention_mask, batch.response_start)
                    logprobs = logprobs_from_logits(models.tempered(logits), batch.response_ids)
                gap = ((logprobs - batch.old_logprobs) * batch.response_mask).abs().max()
                self.record["first_minibatch_gap"].append(float(gap))
                self.record["logit_dtypes"].append(str(logits.dtype))
                self.record["logprob_dtypes"].append(str(logprobs.dtype))
            return ppo_loss(models, batch, config)

        module_file.score_rollout, update.ppo_loss = recording_score, recording_ppo_loss
        evaluation.score_rollout = recording_score  # validation, test and predict score there
        self._originals = score, ppo_loss  # put back at the end of fit (some tests fit in-process)

    # no annotations: DDP refuses a hook whose `bucket` annotation is not the class dist.GradBucket itself
    def _counting_allreduce(self, state, bucket):
        if bucket.index() == 0:  # one count per gradient all-reduce, however many buckets
            self.record["allreduces"] += 1
        return allreduce_hook(state, bucket)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        self._first_loss_done = False
        self.record["queries"].append(list(batch["query"]))
        self.record["kl_coef"].append(float(pl_module.kl_ctl.value))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module_file.score_rollout, update.ppo_loss = self._originals
        evaluation.score_rollout = self._originals[0]
        self.record["end_hash"] = weights_hash(pl_module.policy)
        self.record["global_step"] = trainer.global_step
        sampler = trainer.train_dataloader.sampler
        self.record["sampler"] = type(sampler).__name__
        self.record["distributed_sampler"] = isinstance(sampler, DistributedSampler)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
