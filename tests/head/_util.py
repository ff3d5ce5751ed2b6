"""Helpers shared by the head-method tests."""

from torch import nn


class Counting(nn.Module):
    """Wraps a module and counts its forward calls (to prove a cache is used)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)
