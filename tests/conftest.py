"""Shared pytest setup: make the shared test modules of this folder (`harness.py` and the others
beside it) importable, and keep torch to one thread."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)
