import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # brute_force.py
# the tests run on the CPU even where a GPU is visible or FLATLIB_DEVICE is exported (the bit-identity
# and gloo DDP tests assume it); tests/test_device.py asks for the GPU explicitly
os.environ["FLATLIB_DEVICE"] = "cpu"
torch.set_num_threads(1)  # tests are small; one thread is faster and deterministic
