import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# The test machine has 2 cores shared by the test process and any server it starts.
torch.set_num_threads(1)


import pytest
from safetensors.torch import save_file


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data folder holding one tiny random checkpoint, as a user's models/Stable-diffusion would."""
    from tests.tiny import tiny_sd_model

    root = tmp_path_factory.mktemp("data")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in tiny_sd_model(seed=0).state_dict().items()}
    save_file(state, folder / "tiny.safetensors", metadata={"resolution": "64"})
    return root
