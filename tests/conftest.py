import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # brute_force.py
torch.set_num_threads(1)  # tests are small; one thread is faster and deterministic
