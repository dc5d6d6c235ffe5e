"""Models and tokenizers named by a local folder or a Hugging Face hub id (``name``, ``org/name``, with an optional
``@revision``), resolved through huggingface_hub's local cache.

A hub id is looked up in the cache (``HF_HOME`` / ``HF_HUB_CACHE``) first — a cached revision is used without
asking the hub — and downloaded once, by huggingface_hub, only when it is not cached and the network is allowed;
with ``HF_HUB_OFFLINE=1`` an id that is not cached is one error saying how to fetch it. Only configs, tokenizer
files and safetensors weights are fetched (never pickled ``.bin`` weights). Every other module receives the
local snapshot folder, so transformers itself never goes to the network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gptkit.errors import UserError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]  # *.py: trust_remote_code only


@dataclass(frozen=True)
class Source:
    """Where a model came from: ``path`` (the local folder used), and for a hub id its ``repo_id``, the
    ``revision`` asked for and the ``commit`` it resolved to (recorded in run.json)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def record(self) -> dict:
        if self.repo_id is None:
            return {"path": str(self.path)}
        return {"hub_id": self.repo_id, "revision": self.revision, "commit": self.commit, "path": str(self.path)}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str) -> bool:
    """``gpt2``, ``org/name``, ``org/name@rev`` — and not a path (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    repo_id = name.partition("@")[0]
    return bool(_ID.match(repo_id)) and not name.startswith((".", "/", "~"))


def resolve(name: str, field: str, weights: bool = False) -> Source:
    """A local directory as it is, or a hub id's snapshot folder in the local cache (fetched when allowed).
    ``weights``: the snapshot must hold safetensors weights (a cache filled by a tokenizer-only download does not)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return Source(path)
    if not is_hub_id(name):
        raise UserError(f"{field}: '{name}' is neither a local directory nor a Hugging Face hub id "
                        "(name, org/name or org/name@revision)")
    return _snapshot(name, field, weights, offline(), os.environ.get("HF_HUB_CACHE", ""), os.environ.get("HF_HOME", ""))


def _has_weights(folder: str | Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


@lru_cache(maxsize=32)
def _snapshot(name: str, field: str, weights: bool, no_network: bool, *_cache_env: str) -> Source:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, _, revision = name.partition("@")
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:  # the cache first: a cached revision is used as it is, without asking the hub (`hf download` refreshes)
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=FILES, local_files_only=True,
                                   cache_dir=cache)
    except LocalEntryNotFoundError:
        folder = None
    if folder and weights and not _has_weights(folder):
        if no_network:
            raise UserError(f"{field}: '{name}' is in the local Hugging Face cache ({cache}) without its safetensors "
                            f"weights and HF_HUB_OFFLINE=1; fetch them once with `{fetch}`")
        folder = None  # a cache filled by a tokenizer-only download: fetch the rest
    try:
        folder = folder or snapshot_download(repo_id, revision=revision or None, allow_patterns=FILES,
                                             local_files_only=no_network, cache_dir=cache)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE=1" if no_network else "the hub could not be reached"
        raise UserError(f"{field}: '{name}' is no local directory, is not in the local Hugging Face cache ({cache}) "
                        f"and {why}; fetch it once with `{fetch}` (or point {field} to a local directory)") from None
    except RevisionNotFoundError:
        raise UserError(f"{field}: '{name}': revision '{revision}' not found on the hub") from None
    except GatedRepoError:
        raise UserError(f"{field}: '{repo_id}' is gated: accept its licence on the hub and log in "
                        "(`hf auth login`), then run again") from None
    except RepositoryNotFoundError:
        raise UserError(f"{field}: '{repo_id}' is not a model on the Hugging Face hub (or it is private: "
                        "log in with `hf auth login`)") from None
    if weights and not _has_weights(folder):  # the hub could not be reached and the cache's snapshot came back
        raise UserError(f"{field}: '{name}' is in the local Hugging Face cache ({cache}) without its safetensors "
                        f"weights and the hub could not be reached; fetch them once with `{fetch}`")
    path = Path(folder)
    return Source(path, repo_id, revision or "main", path.name)
