"""Trainable Projected Gradient Method (TPGM): per-tensor distance constraints learned on validation data.

Tian, Ren, Kira, Kuo et al. "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023 (official
code: PotatoTian/TPGM ``DomainNet_ResNet_Exp/utils/tpgm.py`` and ``ImageNet_ViT_Exp/utils/tpgm.py``).

Each fine-tuned tensor θ (anchor θ0, the pretrained value) gets a radius γ; its projection is::

    P_γ(θ) = θ0 + clamp(γ / (‖θ − θ0‖ + 1e-8), 0, 1) · (θ − θ0)

with the MARS norm (per row, L1; default) or the L2 norm of the tensor (:mod:`finereg.optim._projection`).
The radii are learned by minimizing the loss of the projected model on held-out *validation* batches, the
gradient flowing into γ only (θ and the norms are constants): Adam, lr 1e-2; γ starts at min_rows‖θ − θ0‖ / 2
and is clipped to [1e-8, max_rows ‖θ − θ0‖] before each use. Then the projection is applied to the weights.
Use it once after training (post-hoc) or every N steps during training (``project_(steps)`` each time: γ and
its Adam state carry over).

The validation data is given once, at construction, and no method takes other data, so the test split can only
reach TPGM if it is passed as the validation split. Differences from the official code: the projected model is
evaluated with ``torch.func.functional_call`` on projected tensors (the official code deep-copies the model at
every iteration); the ratio is clamped to [0, 1] for both norms (the ViT version does not clamp it, so rows with
a norm below γ are pushed *away* from θ0); a 1-D tensor is one MARS row (the ResNet version treats each value as
a row); γ is initialized at the first projection, from the weights of that moment (official: the same).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError, check_choice, check_int, check_number
from .._utils import unwrap
from ..optim._base import _patterns
from ..optim._projection import NORMS, RowLayout
from ..weight.l2 import _anchor_tensors, canonical_name

__all__ = ["TPGM"]

EPS = 1e-8


class TPGM:
    """TPGM's projection of ``model`` towards its anchors, with radii learned on validation batches.

    Args:
        model: the model being fine-tuned (create TPGM before training when ``anchors`` is None).
        val_batches: the validation data: an iterable of ``(x, y, ...)`` batches (a DataLoader), cycled.
        anchors: θ0: ``None`` (the model's values now), or the pretrained model / state dict matched by name.
        norm: ``"mars"`` (default) or ``"l2"``.
        lr: the learning rate of the radii's Adam (official 1e-2).
        exclude: glob patterns or parameters not projected (e.g. a new head ``"fc.*"``); parameters with
            ``requires_grad=False`` and parameters without an anchor are not projected either.
        criterion: ``criterion(outputs, y)``, the validation loss (default cross-entropy).

    Example::

        tpgm = finereg.TPGM(model, val_loader, exclude=["fc.*"])
        ...                                  # fine-tune model
        tpgm.project_(steps=200)             # learn γ on validation batches, project the weights
    """

    def __init__(
        self,
        model: nn.Module,
        val_batches: Iterable,
        anchors: nn.Module | Mapping[str, Tensor] | None = None,
        *,
        norm: str = "mars",
        lr: float = 1e-2,
        exclude: Any = (),
        criterion: Callable[[Any, Tensor], Tensor] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise FineregError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(val_batches, Iterable) or isinstance(val_batches, (Tensor, str)):
            raise FineregError("val_batches must be an iterable of (x, y, ...) validation batches (a DataLoader)")
        self.model = model
        self._val = val_batches
        self._it = None
        self._yielded = 0  # batches drawn so far
        self.norm = check_choice(norm, "norm", NORMS)
        self.criterion = criterion if criterion is not None else F.cross_entropy
        net = unwrap(model)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        pats, tensors = _patterns(exclude, "exclude")
        excluded = {id(t) for t in tensors}
        for pat in pats:
            hits = [n for n, _ in named if fnmatch.fnmatchcase(canonical_name(n), pat)]
            if not hits:
                raise FineregError(f"exclude pattern {pat!r} matches no trainable parameter of the model")
            excluded.update(id(p) for n, p in named if n in hits)
        named = [(n, p) for n, p in named if id(p) not in excluded]
        if anchors is None:
            table = {canonical_name(n): p for n, p in named}
        else:
            table = _anchor_tensors(anchors)
        self.names = [n for n, p in named if canonical_name(n) in table and table[canonical_name(n)].shape == p.shape]
        if not self.names:
            raise FineregError("no trainable parameter of the model has an anchor of its name and shape to project")
        params = dict(named)
        self._params = [params[n] for n in self.names]
        self.anchors = [table[canonical_name(n)].detach().to(p, copy=True) for n, p in zip(self.names, self._params)]
        self.layout = RowLayout(self._params, self.norm)
        device = self._params[0].device
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32
        self.gamma = torch.zeros(len(self.names), device=device, dtype=dtype, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.gamma], lr=check_number(lr, "lr", low=0, low_open=True))
        self.initialized = False

    # ------------------------------------------------------------------------------------------- core
    def _geometry(self) -> tuple[Tensor, Tensor, Tensor]:
        """(θ0 flat, θ − θ0 flat, row norms) for the current weights (constants for the radii)."""
        with torch.no_grad():
            disp = torch._foreach_sub(self._params, self.anchors)
            return self.layout.flat(self.anchors), self.layout.flat(disp), self.layout.norms(disp).to(self.gamma.dtype)

    def _clip(self, norms: Tensor) -> None:
        """Initialize γ (first use: min row norm / 2) and clip it to [1e-8, max row norm]."""
        with torch.no_grad():
            if not self.initialized:
                self.gamma.copy_(self.layout.tensor_min(norms) / 2)
                self.initialized = True
            self.gamma.copy_(torch.minimum(self.gamma.clamp_min(EPS), self.layout.tensor_max(norms)))

    def _projected(self, base: Tensor, disp: Tensor, norms: Tensor) -> list[Tensor]:
        """P_γ(θ) for each tensor, differentiable in γ."""
        ratio = (self.layout.to_rows(self.gamma) / (norms + EPS)).clamp(0.0, 1.0)
        flat = base + disp * self.layout.to_values(ratio).to(disp.dtype)
        return self.layout.unflat(flat, [p.shape for p in self._params])

    def _next_batch(self) -> Any:
        if self._it is None:
            self._it = iter(self._val)
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self._val)
            try:
                batch = next(self._it)
            except StopIteration:
                if self._yielded:
                    raise FineregError(
                        f"val_batches ran out after {self._yielded} batch(es) and cannot start again: it is a "
                        f"one-shot iterator ({type(self._val).__name__}); TPGM cycles its validation data, so give "
                        "a re-iterable (a list of batches or a DataLoader)"
                    ) from None
                raise FineregError("val_batches yielded no batch") from None
        self._yielded += 1
        return batch

    # ------------------------------------------------------------------------------------------- API
    def fit(self, steps: int) -> list[float]:
        """``steps`` Adam steps on γ, each on the next validation batch (the loader is cycled). The model runs
        in eval mode (restored after) and its weights are not changed. Returns the validation loss of each step
        (before its update)."""
        from torch.func import functional_call

        steps = check_int(steps, "steps", low=1)
        net = unwrap(self.model)
        base, disp, norms = self._geometry()
        losses = []
        was_training = net.training
        net.eval()
        try:
            for _ in range(steps):
                batch = self._next_batch()
                if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
                    raise FineregError("val_batches must yield (inputs, labels, ...) batches")
                device = self.gamma.device
                x = batch[0].to(device) if isinstance(batch[0], Tensor) else batch[0]
                y = batch[1].to(device) if isinstance(batch[1], Tensor) else batch[1]
                self._clip(norms)
                with torch.enable_grad():
                    out = functional_call(net, dict(zip(self.names, self._projected(base, disp, norms))), (x,))
                    loss = self.criterion(out, y)
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
                        raise FineregError(
                            f"criterion must return a scalar loss tensor, got {got}: reduce it (e.g. reduction='mean')"
                        )
                    if not torch.isfinite(loss.detach()).all():  # an Adam step on it would make every radius NaN
                        raise FineregError(
                            f"the validation loss of TPGM step {len(losses) + 1} is {float(loss.detach())}: the "
                            "radii and the model are left as they were; check the validation batches and the model"
                        )
                    self.optimizer.zero_grad()
                    loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            net.train(was_training)
        return losses

    @torch.no_grad()
    def apply_(self) -> None:
        """Project the model's weights in place with the current radii (clipped to the current weights)."""
        if not torch.isfinite(self.gamma).all():
            bad = [self.names[i] for i in torch.nonzero(~torch.isfinite(self.gamma)).flatten().tolist()]
            raise FineregError(f"TPGM radii are not finite ({', '.join(bad[:4])}): the weights were not projected")
        base, disp, norms = self._geometry()
        self._clip(norms)
        torch._foreach_copy_(self._params, self._projected(base, disp, norms))

    def project_(self, steps: int) -> list[float]:
        """:meth:`fit` for ``steps`` validation batches, then :meth:`apply_` (the official ``tpgm_iters``)."""
        losses = self.fit(steps)
        self.apply_()
        return losses

    @property
    def radii(self) -> dict[str, float]:
        """γ of each projected tensor, by name."""
        return dict(zip(self.names, self.gamma.detach().tolist()))

    def state_dict(self) -> dict[str, Any]:
        """γ, its Adam state, whether γ was initialized, and the anchors (by name)."""
        return {
            "names": list(self.names),
            "gamma": self.gamma.detach().clone(),
            "initialized": self.initialized,
            "optimizer": self.optimizer.state_dict(),
            "anchors": {n: a for n, a in zip(self.names, self.anchors)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("names", [])) != self.names:
            raise FineregError("this TPGM state was saved for other parameters (names differ); same model/exclude?")
        with torch.no_grad():
            self.gamma.copy_(state["gamma"])
            for a, n in zip(self.anchors, self.names):
                a.copy_(state["anchors"][n])
        self.initialized = bool(state["initialized"])
        self.optimizer.load_state_dict(state["optimizer"])
