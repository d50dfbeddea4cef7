# The Triton interpreter must be switched on before any kernel is defined, so this runs
# before ligerzoo is imported. CPU tensors then go through the real Triton kernels.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
