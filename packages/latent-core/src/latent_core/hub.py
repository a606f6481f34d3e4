"""Model and data-set aliases (METHODS.md section 0) and loading that fails fast and clearly when offline.

``load_model("qwen2.5-vl-3b")`` resolves the alias to ``Qwen/Qwen2.5-VL-3B-Instruct``, loads its config,
checks its family and loads it with the family's class. When the Hub cannot be reached, the
loaders use the local Hugging Face cache only and, if the files are not there, raise
:class:`ModelNotAvailableError` at once. Without this, ``huggingface_hub`` retries a failing connection
five times with back-off (about 25 s per file) before giving up.

Offline mode is honoured: ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``), read when the loader is
called, or ``local_files_only=True``, skip the network entirely.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import constants as hf_constants
from safetensors import SafetensorError

from latent_core.families import family_of, get_family

__all__ = [
    "ALIASES",
    "DATASET_ALIASES",
    "CheckpointError",
    "ModelNotAvailableError",
    "UnknownAliasError",
    "check_tensors",
    "load_config",
    "load_model",
    "load_pretrained",
    "load_processor",
    "load_tensors",
    "resolve_dataset_id",
    "resolve_model_id",
]

ALIASES: dict[str, str] = {
    "llava-cot-11b": "Xkev/Llama-3.2V-11B-cot",
    "llama-3.2-11b-vision": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "vicuna-7b": "lmsys/vicuna-7b-v1.5",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "clip-vit-l-14": "openai/clip-vit-large-patch14",
}
"""Model aliases (lower case; resolution is case-insensitive) -> Hugging Face Hub ids."""

DATASET_ALIASES: dict[str, str] = {
    "llava-cot-100k": "Xkev/LLaVA-CoT-100k",
    "visual-cot": "deepcs233/Visual-CoT",
}
"""Data-set aliases (lower case; resolution is case-insensitive) -> Hugging Face Hub data-set ids."""

# "org/name": one slash, Hub-legal characters, not starting with "." (so "./x" and "../x" stay paths).
_HUB_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+")

# Keyword arguments of `from_pretrained` that concern where files come from; they go to the config too.
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies", "subfolder")

_PROBE_TIMEOUT_S = 3.0
_PROBE_CACHE_S = 30.0
_probe_cache: dict[str, tuple[float, str | None]] = {}


class UnknownAliasError(ValueError):
    """A name that is not a known alias, not an existing local path and not a Hub id (``org/name``)."""


class ModelNotAvailableError(OSError):
    """The files of a Hub model could not be reached (offline, no access, or wrong id).

    Attributes:
        hub_id: the Hub id that was tried (``None`` if unknown).
    """

    def __init__(self, message: str, hub_id: str | None = None) -> None:
        super().__init__(message)
        self.hub_id = hub_id


class CheckpointError(ValueError):
    """A local checkpoint directory that cannot be loaded: no ``config.json``, or corrupted/truncated weights."""


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """``safetensors.torch.load_file(path)``, with a message that names the file when it is missing, truncated or
    not safetensors (an adapter, extra modules, a states shard).

    Raises:
        CheckpointError: the file is unreadable (its path and the reason in the message).
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is missing, truncated or not a safetensors file ({err})") from None


def check_tensors(path: str | os.PathLike) -> None:
    """Read ``path``'s safetensors header only (cheap); :class:`CheckpointError` naming the file when it is bad."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is missing, truncated or not a safetensors file ({err})") from None


def _known(aliases: dict[str, str]) -> str:
    return ", ".join(f"{alias} = {hub_id}" for alias, hub_id in aliases.items())


def _resolve(name_or_path: str, aliases: dict[str, str], what: str) -> str:
    name = str(name_or_path).strip()
    if os.path.exists(os.path.expanduser(name)):
        return name
    hub_id = aliases.get(name.lower())
    if hub_id is not None:
        return hub_id
    if _HUB_ID.fullmatch(name):
        return name
    raise UnknownAliasError(
        f"{name_or_path!r} is not a known {what} alias, an existing local path, or a Hub id of the form "
        f"'org/name'. Known aliases: {_known(aliases)}."
    )


def resolve_model_id(name_or_path: str) -> str:
    """Turn an alias, local path or Hub id into what ``from_pretrained`` takes.

    An existing local path is returned unchanged (it wins over an alias of the same name, so a directory
    made with ``--local-dir vicuna-7b`` is used as is); an alias (case-insensitive) gives its Hub id;
    anything shaped like ``org/name`` passes through. Anything else raises :class:`UnknownAliasError`,
    whose message lists the known aliases.
    """
    return _resolve(name_or_path, ALIASES, "model")


def resolve_dataset_id(name_or_path: str) -> str:
    """Like :func:`resolve_model_id` for data sets (:data:`DATASET_ALIASES`)."""
    return _resolve(name_or_path, DATASET_ALIASES, "data set")


def _offline_by_env() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as huggingface_hub read them at import or as set now."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(hf_constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_unreachable(endpoint: str | None = None, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub endpoint cannot be reached, or ``None`` if a TCP connection to it opens.

    One connection attempt without retries (DNS failures and refused connections return at once, a
    silent firewall after ``timeout`` seconds); the answer is cached for 30 s. When an HTTP(S) proxy is
    configured a direct connection says nothing, so the probe is skipped and ``None`` returned.
    """
    endpoint = endpoint or hf_constants.ENDPOINT
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    now = time.monotonic()
    cached = _probe_cache.get(endpoint)
    if cached is not None and now - cached[0] < _PROBE_CACHE_S:
        return cached[1]
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    reason = None
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            pass
    except OSError as err:
        reason = f"cannot connect to {endpoint}: {err}"
    _probe_cache[endpoint] = (now, reason)
    return reason


def _not_available(name_or_path: str, hub_id: str, reason: str) -> ModelNotAvailableError:
    alias = f" (alias {name_or_path!r})" if name_or_path != hub_id else ""
    return ModelNotAvailableError(
        f"Could not load {hub_id!r}{alias}: its files could not be reached and are not in the local Hugging "
        f"Face cache ({reason}). The machine may be offline, the repository may be gated and need access "
        "(`hf auth login`), or the id may be wrong. To use a local copy, download it on a machine with "
        f"network (`hf download {hub_id} --local-dir /path/to/dir`; `huggingface-cli download` on "
        "huggingface_hub < 1.0) and pass the local directory instead, e.g. `--model /path/to/dir`.",
        hub_id=hub_id,
    )


def _from_hub(load: Callable[..., Any], name_or_path: str, resolved: str, kwargs: dict[str, Any]) -> Any:
    """Call ``load(resolved, **kwargs)``; cache only when the Hub is unreachable; wrap availability errors."""
    if os.path.isdir(os.path.expanduser(resolved)):
        return load(os.path.expanduser(resolved), **kwargs)
    if kwargs.get("local_files_only"):
        reason = "local_files_only=True"
    elif _offline_by_env():
        reason = "offline mode: HF_HUB_OFFLINE is set"
    else:
        reason = _hub_unreachable()
    if reason is not None:
        kwargs = {**kwargs, "local_files_only": True}
    try:
        return load(resolved, **kwargs)
    except ModelNotAvailableError:
        raise
    except OSError as err:
        raise _not_available(name_or_path, resolved, reason or str(err).splitlines()[0]) from err


def load_config(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained`` on the resolved alias/path/id (``trust_remote_code=False`` by default).

    Raises:
        UnknownAliasError: see :func:`resolve_model_id`.
        ModelNotAvailableError: the files are neither reachable on the Hub nor in the local cache.
    """
    return _load_config(name_or_path, resolve_model_id(name_or_path), kwargs)


def _load_config(name_or_path: str, resolved: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs.setdefault("trust_remote_code", False)
    local = os.path.expanduser(resolved)
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, kwargs.get("subfolder", ""), "config.json")):
        raise CheckpointError(
            f"{resolved!r} is a directory but not a checkpoint: it has no config.json. Pass the directory that "
            "`save_pretrained` (or `hf download ... --local-dir`) wrote."
        )
    return _from_hub(AutoConfig.from_pretrained, name_or_path, resolved, kwargs)


def load_model(
    name_or_path: str,
    *,
    family: str | None = None,
    dtype: Any = None,
    device_map: Any = None,
    **kwargs: Any,
) -> Any:
    """Load a model of a supported family from an alias, local directory or Hub id.

    Resolves the name, loads the config, finds its family (:func:`latent_core.families.family_of`) and
    loads the weights with that family's class. ``dtype`` and ``device_map`` go to ``from_pretrained``
    when given; other keyword arguments too (``revision``, ``cache_dir``, ``token`` and
    ``local_files_only`` also go to the config).

    Raises:
        ValueError: ``family`` is given and the model is of another family, or the model's family is
            not supported.
        CheckpointError: a local directory without ``config.json``, or with corrupted weight files.
        UnknownAliasError: see :func:`resolve_model_id`.
        ModelNotAvailableError: the files are neither reachable on the Hub nor in the local cache.
    """
    resolved = resolve_model_id(name_or_path)
    expected = get_family(family) if family is not None else None
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    kwargs.setdefault("trust_remote_code", False)
    config = _load_config(name_or_path, resolved, {"trust_remote_code": kwargs["trust_remote_code"], **hub_kwargs})
    spec = family_of(config)
    if expected is not None and spec.name != expected.name:
        shown = f"{name_or_path!r}" + (f" ({resolved})" if resolved != name_or_path else "")
        raise ValueError(
            f"model {shown} is family {spec.name!r} (model_type {config.model_type!r}), expected {expected.name!r}"
        )
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return _from_hub(spec.model_class.from_pretrained, name_or_path, resolved, {"config": config, **kwargs})
    except SafetensorError as err:
        raise CheckpointError(
            f"the weights of {resolved!r} are corrupted or truncated ({err}). Download or export the checkpoint "
            "again; `hf download` resumes and verifies partial files."
        ) from err


def load_pretrained(loader: Callable[..., Any], name_or_path: str, **kwargs: Any) -> Any:
    """``loader(resolved, **kwargs)`` for any ``from_pretrained`` (e.g. ``CLIPVisionModel.from_pretrained`` on a
    full CLIP checkpoint, ``CLIPImageProcessor.from_pretrained``) with the alias resolution, offline handling and
    errors of :func:`load_model` (``trust_remote_code=False`` by default).

    Raises:
        UnknownAliasError: see :func:`resolve_model_id`.
        ModelNotAvailableError: the files are neither reachable on the Hub nor in the local cache.
    """
    kwargs.setdefault("trust_remote_code", False)
    try:
        return _from_hub(loader, name_or_path, resolve_model_id(name_or_path), kwargs)
    except SafetensorError as err:
        raise CheckpointError(f"the weights of {name_or_path!r} are corrupted or truncated ({err})") from err


def load_processor(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained``, falling back to ``AutoTokenizer`` for text-only models.

    Raises:
        UnknownAliasError: see :func:`resolve_model_id`.
        ModelNotAvailableError: the files are neither reachable on the Hub nor in the local cache.
    """
    from transformers import AutoProcessor, AutoTokenizer

    resolved = resolve_model_id(name_or_path)
    kwargs.setdefault("trust_remote_code", False)
    try:
        return _from_hub(AutoProcessor.from_pretrained, name_or_path, resolved, kwargs)
    except ModelNotAvailableError:
        raise
    except ValueError:  # "Unrecognized processing class": no processor and no tokenizer AutoProcessor found
        return _from_hub(AutoTokenizer.from_pretrained, name_or_path, resolved, kwargs)
