"""A Hugging Face hub id -> a local model folder, for `tritonchat build --model <owner>/<name>`.

Through huggingface_hub's `snapshot_download`: only the files a build reads (config, tokenizer, safetensors
weights, chat template), into the hub cache (`$HF_HOME`, default ~/.cache/huggingface) or `local_dir`.
An interrupted download resumes where it stopped when the same command runs again (huggingface_hub keeps
the partial file beside the cache and asks the server for the rest). `HF_ENDPOINT` sends every request to
a mirror instead of huggingface.co (e.g. `HF_ENDPOINT=https://hf-mirror.com` where the hub is slow or
blocked); `HF_TOKEN` for gated models; `HF_HUB_OFFLINE=1` uses the cache only.

    owner/name            the default branch
    owner/name@revision   a branch, tag or commit
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Tuple

DEFAULT_ENDPOINT = "https://huggingface.co"
# what `tritonchat build` reads: configs, tokenizers, weights, chat templates (no .bin / .pt duplicates)
BUILD_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class DownloadError(RuntimeError):
    """The model could not be had; the message says from where and what to try."""


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text


def split_revision(model: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = model.partition("@")
    return repo_id, revision or None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or DEFAULT_ENDPOINT


def download_model(model: str, *, local_dir: Optional[Path] = None, token: Optional[str] = None) -> Path:
    """The folder holding `model` (a hub id, optionally `@revision`), downloaded or resumed as needed."""
    if not is_hub_id(model):
        raise DownloadError(f"{model!r} is neither a local folder nor a hub id of the form owner/name[@revision]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, revision = split_revision(model)
    where = endpoint()
    try:
        # the endpoint is passed on each call: huggingface_hub reads HF_ENDPOINT once, when it is imported
        path = snapshot_download(repo_id, revision=revision, allow_patterns=BUILD_FILES, local_dir=local_dir,
                                 endpoint=where, token=token)
    except GatedRepoError as exc:
        raise DownloadError(f"{repo_id} is gated on {where}: accept its licence on the model page and set HF_TOKEN "
                            f"({_first(exc)})") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo_id} has no revision {revision!r} on {where} ({_first(exc)})") from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"{repo_id} was not found on {where} (a typo? a private model needs HF_TOKEN) "
                            f"({_first(exc)})") from exc
    except LocalEntryNotFoundError as exc:
        raise DownloadError(f"{repo_id} is not in the local cache and {where} cannot be reached: check the network, "
                            "or set HF_ENDPOINT to a mirror (HF_ENDPOINT=https://hf-mirror.com); a download that "
                            f"stopped resumes when you run the command again ({_first(exc)})") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"downloading {repo_id} from {where} failed: {_first(exc)}. Run the command again to "
                            "resume; HF_ENDPOINT selects a mirror") from exc
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DownloadError(f"{repo_id} ({where}) has no config.json: not a transformers model")
    return folder


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
