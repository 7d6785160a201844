"""Shared pytest setup: one intra-op thread (tiny models run fastest that way on 2 cores)."""

import os

import torch

# Tiny test models spend their time in op dispatch, not in BLAS: threads only add contention.
torch.set_num_threads(int(os.environ.get("SIMPO_TEST_THREADS", "1")))
