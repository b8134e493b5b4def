"""Test setup: Triton runs on CPU under its interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported, so this happens at conftest import, before any
test module imports fastbert's kernels.
"""
import os

import pytest
import torch

from fastbert.testing import (enable_triton_interpreter_if_no_gpu, patch_triton_interpreter_address_check,
                              patch_triton_interpreter_bf16_dot, patch_triton_interpreter_round_to_nearest)

INTERPRET = enable_triton_interpreter_if_no_gpu()
if INTERPRET:
    # TEST-ONLY: the interpreter's bf16 tl.dot is broken on CPU (see fastbert.testing).
    patch_triton_interpreter_bf16_dot()
    patch_triton_interpreter_round_to_nearest()  # TEST-ONLY: bf16 conversions round to nearest even, as on a GPU
    patch_triton_interpreter_address_check()  # an unmasked load past a tensor is an error, not luck

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with
    FASTBERT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("FASTBERT_TEST_SEED", "0")) or (torch.seed() % (2**31))
    torch.manual_seed(seed)
    print(f"FASTBERT_TEST_SEED={seed}")
    yield
