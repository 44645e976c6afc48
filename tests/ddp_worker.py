"""Launched by test_train.py under torchrun: one DDP training run into the given store."""

import json
import sys

import torch

from flatlib.runner.runs import RunStore
from flatlib.training.train import PretrainConfig, pretrain

if __name__ == "__main__":
    torch.set_num_threads(1)
    store, config = sys.argv[1], PretrainConfig.from_dict(json.loads(sys.argv[2]))
    pretrain(config, RunStore(store), progress=False)
