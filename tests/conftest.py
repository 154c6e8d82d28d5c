"""Shared pytest setup: make `tests/harness.py` importable and keep torch to one thread."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)
