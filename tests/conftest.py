"""Test-wide helpers: where the shared data (`../shared`, never part of this repository) lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_dir() -> Path:
    """$TRITONCHAT_SHARED, else `shared/` beside this checkout (../shared from the repo root)."""
    env = os.environ.get("TRITONCHAT_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


SHARED = shared_dir()


def need_shared(*parts: str) -> Path:
    """The shared file or folder `parts`, or skip the test saying which one is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        rel = "/".join(parts)
        pytest.skip(f"../shared/{rel} not found: {path} is missing "
                    f"(put the shared test data beside this checkout or set TRITONCHAT_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return SHARED


# -- the stories260K repository and its real tritonserver, shared by several test files ----------

@pytest.fixture(scope="session")
def stories_repo(tmp_path_factory):
    from e2e_helpers import STORIES, build_repo, need

    need(STORIES)
    return build_repo(STORIES, tmp_path_factory.mktemp("stories") / "repo")


@pytest.fixture(scope="session")
def stories_server(stories_repo):
    from tritonchat.server import TritonServer

    with TritonServer(stories_repo) as srv:
        yield srv
