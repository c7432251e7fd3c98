"""Models and datasets named by their Hugging Face Hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"), found in the
local Hugging Face cache and never downloaded.

The cache is huggingface_hub's: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub, laid out as
`models--org--name/snapshots/<commit>/...` (`datasets--org--name/...` for datasets), with `refs/main` naming the
commit. `hf download ORG/NAME` (or any `from_pretrained`/`load_dataset` with a network) fills it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from lorakit.core.errors import LorakitError

# "org/name" as the Hub spells ids: no leading dot or dash, one slash
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_repo_id(spec: str) -> bool:
    """Whether `spec` has the shape of a Hub id (`org/name`), as opposed to a deeper or absolute path."""
    return bool(REPO_ID.match(spec))


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder this process uses (HF_HUB_CACHE / HF_HOME, read by huggingface_hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, repo_type: Literal["model", "dataset"] = "model") -> Path:
    """The folder of `repo_id`'s cached snapshot (the revision `main` points to), without any network access.

    Args:
        repo_id: a Hub id, `org/name`.
        repo_type: "model" or "dataset".

    Returns:
        `<cache>/<models|datasets>--org--name/snapshots/<commit>`.

    Raises:
        LorakitError: the repository is not in the local cache; the message names the cache folder.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except LocalEntryNotFoundError:
        option = "" if repo_type == "model" else " --repo-type dataset"
        raise LorakitError(
            f"{repo_id!r} is not a local path, and not a {repo_type} in the local Hugging Face cache "
            f"({hub_cache_dir()}); lorakit never downloads. Fetch it on a machine with network access with "
            f"`hf download {repo_id}{option}` (HF_HOME or HF_HUB_CACHE choose the cache folder), or pass a local "
            "path.") from None
