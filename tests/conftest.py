# Without a GPU, the Triton interpreter is switched on before any kernel is defined (so
# before ligerzoo is imported): CPU tensors then go through the real Triton kernels. With a
# GPU the kernels compile for it; set TRITON_INTERPRET=0 explicitly to be sure.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests import launch_check  # noqa: E402

launch_check.install()  # every package kernel launch must take DirectLaunch's fast path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
