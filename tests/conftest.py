"""Shared test set-up.

Triton kernels run in Triton's interpreter on machines without a CUDA device. The variable must be
set before triton is first imported, which is why it is set here, at collection start.
"""
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ../shared/data beside the repository root; MOLMOE_SHARED_DATA points elsewhere (a git worktree
# that does not sit beside shared/, a fresh clone in /tmp).
SHARED_DATA = pathlib.Path(os.environ.get("MOLMOE_SHARED_DATA") or
                           pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The released config/tokenizer/processor files (../shared/data); never copied into the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"released data files not found at {SHARED_DATA} (set MOLMOE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen2(shared_data):
    """Molmo-7B-D's tokenizer (Qwen2's vocab.json + merges.txt layout), from the released files."""
    from molmoe.processing import Tokenizer

    return Tokenizer.from_dir(shared_data / "molmo-7b-d-0924")


@pytest.fixture(scope="session")
def olmoe(shared_data):
    """MolmoE-1B's tokenizer (OLMoE's tokenizer.json), from the released files."""
    from molmoe.processing import Tokenizer

    return Tokenizer.from_dir(shared_data / "molmoe-1b-0924")


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """Training tests' tiny MolmoE (small crops) and 8 pointing examples: (model dir, JSONL,
    examples); tests/train_fixtures.py."""
    from tests.train_fixtures import pointing_set, tiny_checkpoint

    d = tmp_path_factory.mktemp("train")
    model = tiny_checkpoint(d / "ckpt")
    data, examples = pointing_set(d / "data", 8, seed=1)
    return model, data, examples


def pytest_collection_modifyitems(config, items):
    for item in items:  # every test that reads an sm_90 compile report: `-m sm90` selects them
        if "sm90" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sm90)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (a skip, not a pass)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test that switches autograd off globally (torch.set_grad_enabled(False)) breaks every
    later test that trains or takes gradients, far from the cause: fail the culprit instead."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    torch.set_grad_enabled(before)
    assert after == before, "this test left autograd switched off (torch.set_grad_enabled)"
