import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# The test machine has 2 cores shared by the test process and any server it starts.
torch.set_num_threads(1)
