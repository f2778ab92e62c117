"""Loading teacher weights: safetensors only, no remote code, every key accounted for.

A source is a local directory in HF layout or a HF model id. An id is resolved to a local
snapshot holding only ``*.json`` and ``*.safetensors`` files (never pickled weights), so both
kinds of source then take the same path: read ``config.json``, build the family's config,
``from_pretrained`` with ``output_loading_info=True``, and fail loudly on any missing, unexpected
(outside the prefixes a family may ignore, such as SigLIP's text tower) or mismatched key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from contextlib import contextmanager

import torch
from safetensors import SafetensorError

from featcache.errors import TeacherLoadError

_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)


@contextmanager
def quiet_transformers():
    """Within the block, transformers prints no load reports or progress bars (featcache reports
    problems itself); afterwards its verbosity and progress bars are as the caller had them: a
    library must not change another library's global settings in the caller's process."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_source(source: str, revision: str | None = None) -> str:
    """A local directory holding the source's config and safetensors weights."""
    if os.path.isdir(source):
        return os.path.abspath(source)
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise TeacherLoadError(f"no such model directory: {source}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    except _LOAD_ERRORS as e:
        raise TeacherLoadError(f"cannot fetch {source!r} from the HF hub (offline, or no such model?): "
                               f"{type(e).__name__}: {_first_line(e)}") from e


def read_config(directory: str) -> dict:
    """``config.json`` of a model directory."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise TeacherLoadError(f"{directory} has no config.json: not a model directory in HF layout") from e
    except ValueError as e:
        raise TeacherLoadError(f"{path} is not valid JSON: {e}") from e


def check_model_type(config: dict, accepted: tuple[str, ...], family: str, directory: str) -> str:
    model_type = config.get("model_type")
    if model_type not in accepted:
        raise TeacherLoadError(f"{directory} holds a {model_type!r} model, not one the {family} family loads "
                               f"({', '.join(accepted)})")
    return model_type


def safetensors_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise TeacherLoadError(f"{directory} holds no .safetensors weights (featcache never loads pickled "
                               "weights)")
    return files


def weights_hash(directory: str) -> str:
    """sha256 over the safetensors files (names and bytes): which weights produced a cache."""
    digest = hashlib.sha256()
    for path in safetensors_files(directory):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()


def load_checked(model_cls, directory: str, config, key_mapping: dict[str, str] | None = None,
                 ignorable: tuple[str, ...] = (), dtype: torch.dtype = torch.float32):
    """``model_cls.from_pretrained`` that refuses missing, unexpected or mismatched weights.

    The weights are created in ``dtype`` as they are read (bfloat16 for CUDA: a 7B teacher never
    exists as a float32 copy), with SDPA attention where the class has it."""
    safetensors_files(directory)
    attention = {"attn_implementation": "sdpa"} if getattr(model_cls, "_supports_sdpa", False) else {}
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(directory, config=config, key_mapping=key_mapping,
                                                    output_loading_info=True, use_safetensors=True,
                                                    trust_remote_code=False, dtype=dtype, **attention)
    except _LOAD_ERRORS as e:
        raise TeacherLoadError(f"cannot load weights from {directory}: {type(e).__name__}: {_first_line(e)}") from e
    _check_info(info, directory, ignorable)
    return model.eval()


def _check_info(info: dict, directory: str, ignorable: tuple[str, ...]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not any(re.match(p, k) for p in ignorable))
    mismatched = [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if keys:
            raise TeacherLoadError(f"{directory}: {len(keys)} {what} weights (e.g. {', '.join(keys[:3])}); "
                                   "the checkpoint does not match the model it claims to be")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
