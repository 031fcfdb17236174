"""Shared setup for kernel tests.

Triton reads ``TRITON_INTERPRET`` when it is first imported (it decorates its own ``tl.*`` helpers
then), so on a machine without CUDA it must be set before any test module imports triton; setting it
here, rather than in each test module, makes the result independent of test order.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
