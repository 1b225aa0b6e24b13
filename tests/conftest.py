import os

import pytest
import torch

# Tests run offline and never download: W&B stays offline and quiet, torch/timm hubs are unreachable anyway.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_wandb_service(monkeypatch):
    """A W&B run in this process exports WANDB_SERVICE, which processes the tests start would inherit: they would
    share this process's wandb-core, which still holds a SIGKILLed child's run and refuses to resume it ("run ID
    in use"). Launched as users launch them, each process has its own."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
