"""Project-wide pytest fixtures: the location of the shared reference data."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent


def shared_data_dir() -> Path:
    """The reference data directory: $SHARED_DATA_DIR, default ../shared/data beside the repository."""
    return Path(os.environ.get("SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; fails (never skips) with a clear message when it is missing."""
    path = shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.fail(
            f"Reference data not found at {path}. Put the project's shared/ folder beside the "
            "repository or set SHARED_DATA_DIR to its data/ directory."
        )
    return path


@pytest.fixture(scope="session")
def stories_tokenizer(shared_data: Path) -> Path:
    """stories260K's 512-piece SentencePiece tokenizer (the tiny models' vocabulary in the torch tests)."""
    return shared_data / "stories260k" / "tokenizer.model"


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: tiny models gain nothing from more, and the CI machine's two cores are
    shared (with worker processes, in the end-to-end tests)."""
    import torch  # here, not at the top: the web tests never load torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
