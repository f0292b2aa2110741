"""Loading user-named models and datasets, with errors that name the config key and say what to do.

Every mistake a user can make in a config (a hub id that cannot be reached, a path that does not exist,
a folder that holds no model, a context too short for the lengths asked) raises `ConfigError`; the
command line prints its message alone, without a traceback, and exits with code 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import huggingface_hub
from transformers import PretrainedConfig

from lightning_ppo.errors import ConfigError
from lightning_ppo.tiny import resolve_source

T = TypeVar("T")


def is_offline() -> bool:
    """True when the Hugging Face hub is switched off (`HF_HUB_OFFLINE=1`)."""
    return huggingface_hub.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON")


def looks_like_path(source: str) -> bool:
    """A source that can only be a local path: absolute, `./`, `../`, `~`, or with more than one `/`.

    A hub id is `name` or `namespace/name`, so anything else cannot be one.
    """
    windows_path = os.sep != "/" and os.sep in source
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or windows_path


def load_from_source(load: Callable[[str], T], source: str, key: str, what: str) -> T:
    """`load(path or hub id)` for the value of config `key`, turning loader errors into a `ConfigError`.

    `what` names the thing loaded ("model", "tokenizer", "dataset") for the message.
    """
    try:
        resolved = resolve_source(source)
    except ValueError as error:  # an unknown `tiny:` name
        raise ConfigError(f"{key}={source!r}: {error}") from error
    path = Path(resolved).expanduser()
    if looks_like_path(source) and not path.exists():
        raise ConfigError(f"{key}={source!r}: no such file or folder ({path.absolute()}). Fix the path.")
    try:
        return load(str(path) if path.exists() else resolved)
    except ConfigError:
        raise
    # OSError covers missing files and the hub's errors (HfHubHTTPError, OfflineModeIsEnabled, datasets'
    # DatasetNotFoundError and ConnectionError); ValueError is "Unrecognized model" for a folder without one.
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        if path.exists():
            raise ConfigError(
                f"{key}={source!r}: the {'folder' if path.is_dir() else 'file'} {path.absolute()} holds no "
                f"{what} that can be loaded ({reason}). Point {key} at a folder written by "
                "`save_pretrained`/`save_to_disk`, or at a hub id."
            ) from error
        if is_offline():
            where = "locally, and the hub is switched off (HF_HUB_OFFLINE=1)"
        else:
            where = "locally or on the Hugging Face hub (is the network reachable?)"
        repo_type = " --repo-type dataset" if what == "dataset" else ""
        raise ConfigError(
            f"{key}={source!r}: the {what} could not be found {where}. Download it first on a machine "
            f"with network access, e.g. `hf download {source}{repo_type} --local-dir FOLDER`, and set {key} "
            f"to that local folder. Loader said: {reason}"
        ) from error


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence a model accepts (`n_positions` or `max_position_embeddings`), if it says."""
    text_config = config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_fits_context(
    config: PretrainedConfig, prompt_tokens: int, prompt_key: str, response_tokens: int, policy: str
) -> None:
    """Refuse prompt + response lengths the policy cannot attend over (its positions would overflow)."""
    limit = max_positions(config)
    if limit is not None and prompt_tokens + response_tokens > limit:
        raise ConfigError(
            f"{prompt_key} ({prompt_tokens}) + model.sampling.response_max_length ({response_tokens}) = "
            f"{prompt_tokens + response_tokens} tokens exceeds the {limit} positions of the policy "
            f"model.policy={policy!r}. Lower {prompt_key} or model.sampling.response_max_length."
        )
