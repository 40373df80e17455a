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


@pytest.fixture
def data_dir(tiny_data_dir, tmp_path):
    """A data folder of the test's own holding the tiny checkpoint, for tests that add files."""
    import shutil

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shutil.copy(tiny_data_dir / "models" / "Stable-diffusion" / "tiny.safetensors", folder)
    return tmp_path


@pytest.fixture
def ctx(data_dir):
    """An AppContext on `data_dir`, on the CPU, as webui.py would build it."""
    from modules.app.config import Flags
    from modules.context import AppContext

    return AppContext.create(Flags(data_dir=data_dir, device="cpu"))


@pytest.fixture
def checkpoint_loads(ctx, monkeypatch):
    """(file name, owner of the job running at the time) of each checkpoint `ctx` loads from now on."""
    from modules.models import loader

    loads = []
    load = loader.load_checkpoint

    def recorded(path, vae_path=None):
        running = ctx.jobs.running
        loads.append((path.name, running[0].owner if running else None))
        return load(path, vae_path)

    monkeypatch.setattr(loader, "load_checkpoint", recorded)
    return loads


@pytest.fixture(scope="session")
def live_server(tiny_data_dir):
    """The real web UI on 127.0.0.1 serving tiny_data_dir, started once for every test that drives it."""
    from tests.server import running_server

    with running_server(tiny_data_dir) as url:
        yield url


@pytest.fixture(scope="session")
def builtin_ctx(tmp_path_factory):
    """An AppContext whose only checkpoint is the shipped built-in model (64 px, draws coloured
    shapes), for tests that need pictures that mean something; in float32, so that pictures
    compared bit for bit do not depend on whether the processor computes bfloat16."""
    import shutil
    from pathlib import Path

    from modules.app.config import Flags
    from modules.context import AppContext

    root = tmp_path_factory.mktemp("builtin-data")
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    shipped = Path(__file__).resolve().parent.parent / "models" / "Stable-diffusion" / "builtin-shapes.safetensors"
    shutil.copyfile(shipped, folder / shipped.name)
    return AppContext.create(Flags(data_dir=root, device="cpu", precision="fp32"))
