"""The learning-rate policy of fine-tuning: optimizer parameter groups from what a model declares pretrained or new.

A fine-tuned classifier trains its pretrained parts slower than the parts that are new for the target task. The
model declares each part's role, an ordered mapping submodule name → role, and :func:`param_groups` turns it into
one optimizer parameter group per part, in the declared order (tllib's ``get_parameters`` layout)::

    role           learning rate
    "pretrained"   pretrained_lr_mult · lr     (tllib: 0.1 · lr with --finetune, 1.0 · lr without)
    "new"          lr
    "excluded"     not in the optimizer (never updated, though gradients may flow through it)

tllib's classifiers declare (``tllib/modules/classifier.py``, ``tllib/regularization/{lwf,co_tuning,bi_tuning}.py``):

    Classifier (ERM, DELTA, BSS)   backbone: pretrained, bottleneck: new, head: new
    lwf.Classifier                 backbone: pretrained, bottleneck: new, head_target: new, head_source: excluded
    co_tuning.Classifier           backbone: pretrained, head_source: pretrained, bottleneck: new, head_target: new
    bi_tuning.Classifier           backbone: pretrained, bottleneck: new, head: new, projector: pretrained

finereg's classifiers declare the same by default (:meth:`~finereg.head.lwf.LwFClassifier.param_parts`,
:meth:`~finereg.head.bi_tuning.BiTuningClassifier.param_parts`); where a paper or the engine differs it is an
argument of those methods, e.g. ``source_head="pretrained"`` (LwF's paper trains the old task's head) or
``projector="new"``.

Every parameter of the model must belong to exactly one declared part (an undeclared parameter would silently
never train), and a part may be empty (tllib keeps an empty group for an identity bottleneck).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import nn

from ._checks import FineregError, check_choice, check_number, check_type
from ._utils import get_submodule, unwrap

__all__ = ["Role", "ROLES", "param_groups"]

Role = Literal["pretrained", "new", "excluded"]
ROLES: tuple[str, ...] = ("pretrained", "new", "excluded")


def param_groups(
    model: nn.Module,
    lr: float,
    parts: Mapping[str, Role] | None = None,
    *,
    pretrained_lr_mult: float = 0.1,
) -> list[dict]:
    """Optimizer parameter groups ``[{"params": [...], "lr": ..., "name": part}, ...]`` for ``model``.

    Args:
        model: the model to optimize (a DDP / ``torch.compile`` wrapper is looked through).
        lr: the learning rate of the new parts (tllib's ``base_lr``).
        parts: ordered mapping submodule name → ``"pretrained"``, ``"new"`` or ``"excluded"``; default: what the
            model declares, ``model.param_parts()``.
        pretrained_lr_mult: the pretrained parts' learning rate as a multiple of ``lr`` (default 0.1, tllib's
            ``--finetune``; 1.0 trains every part at ``lr``).

    Returns one group per part that is not excluded, in the order of ``parts``; pass it to any torch optimizer.
    """
    check_type(model, "model", nn.Module, "an nn.Module")
    lr = check_number(lr, "lr", low=0, low_open=True)
    mult = check_number(pretrained_lr_mult, "pretrained_lr_mult", low=0)
    root = unwrap(model)
    if parts is None:
        declare = getattr(root, "param_parts", None)
        if not callable(declare):
            raise FineregError(
                f"{type(root).__name__} declares no parts: pass parts={{'backbone': 'pretrained', 'head': 'new', ...}} "
                "(submodule name -> 'pretrained', 'new' or 'excluded')"
            )
        parts = declare()
    check_type(parts, "parts", Mapping, "a mapping submodule name -> role")
    owner: dict[int, str] = {}
    groups = []
    for name, role in parts.items():
        check_choice(role, f"the role of part {name!r}", ROLES)
        params = list(get_submodule(root, name).parameters())
        for p in params:
            if id(p) in owner:
                raise FineregError(
                    f"a parameter of part {name!r} is also in part {owner[id(p)]!r}: declare parts that do not "
                    "overlap (every parameter in exactly one part)"
                )
            owner[id(p)] = name
        if role != "excluded":
            groups.append({"params": params, "lr": mult * lr if role == "pretrained" else lr, "name": name})
    missing = [n for n, p in root.named_parameters() if id(p) not in owner]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FineregError(
            f"parameters in no declared part: {shown}; add their module to parts (as 'pretrained', 'new' or "
            "'excluded'), so that no parameter is silently left out of the optimizer"
        )
    return groups
