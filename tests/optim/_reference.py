"""Naive per-tensor references of the official SPD and FTP updates (Python loops, state keyed by parameter), and
the golden model of tests/data/robust_reference.pt."""

from __future__ import annotations

import torch
from torch import nn

GOLDEN_ARCH = (
    "nn.Sequential(nn.Conv2d(3,6,3), nn.ReLU(), nn.Conv2d(6,8,3,padding=1), nn.ReLU(), "
    "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,5))"
)


def golden_model(ref):
    model = eval(GOLDEN_ARCH, {"nn": nn}).double()
    model.load_state_dict(ref["start"])
    return model


@torch.no_grad()
def spd_after(params, before, grads, anchors, lam):
    """AdamSPD's projection written out per tensor (θ̃ already in ``params``)."""
    for p, b, g, a in zip(params, before, grads, anchors):
        if g is None:
            continue
        if -(g * (b - a)).sum() < 0:
            new, old = (p - a).norm(), (b - a).norm()
            r = ((new - old) / new).clamp(0, 1)
            p.sub_(lam * r * (p - a))


def mars(t):
    return t.abs().sum(dim=tuple(range(1, t.dim())), keepdim=True) + 1e-8


class FTPReference:
    """The official FTP update per tensor, with its state in a dict keyed by the parameter (the skip-safe
    reading of the official code: a tensor without gradient neither steps nor moves anyone's state)."""

    def __init__(self, anchors, k=1.0, mu=1e-2):
        self.anchors, self.k, self.mu, self.state = anchors, k, mu, {}

    @torch.no_grad()
    def hyper_grads(self, params):
        out = {}
        for p in params:
            s = self.state.get(p)
            if p.grad is not None and s is not None:
                dims = tuple(range(1, p.dim()))
                out[p] = ((p.grad * s["c"]).sum(dim=dims, keepdim=True) * s["scale"]).sum()
        return out

    @torch.no_grad()
    def after(self, params, hyper):
        for p, a in zip(params, self.anchors):
            if p.grad is None or a is None:
                continue
            c = p - a
            norms = mars(c)
            s = self.state.get(p)
            if s is None:
                s = self.state[p] = {"t": 1, "m": 0.0, "v": 0.0}
                gamma = torch.tensor(1e-8, dtype=p.dtype)
            else:
                s["t"] += 1
                h = hyper[p]
                if h > 0:
                    h = h * self.k
                s["m"] = 0.9 * s["m"] + 0.1 * h
                s["v"] = 0.999 * s["v"] + 0.001 * h**2
                mh, vh = s["m"] / (1 - 0.9 ** s["t"]), s["v"] / (1 - 0.999 ** s["t"])
                gamma = (s["gamma"] - self.mu * mh / (vh.sqrt() + 1e-8)).clamp(1e-8, norms.max())
            p.copy_(a + (gamma / norms).clamp(0, 1) * c)
            s.update(gamma=gamma, c=c, scale=1 / norms)
