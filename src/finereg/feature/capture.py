"""Persistent forward hooks that keep the outputs of named submodules.

:class:`FeatureCapture` registers its hooks once, keeps them until :meth:`FeatureCapture.close` (or the end of a
``with`` block), and after every forward of the model holds the latest output of each named module::

    with FeatureCapture(model, ["layer3", "layer4"]) as cap:
        logits = model(x)
        feats = cap.outputs              # OrderedDict: 'layer3' -> tensor, 'layer4' -> tensor

A *selector* picks the tensor out of a module that returns a container (Hugging Face layers return a tuple or a
``ModelOutput`` in some versions and a tensor in others): an ``int`` (position in a tuple/list/``ModelOutput``),
a ``str`` (key of a dict/``ModelOutput`` or attribute name) or a callable ``output -> value``. Integer and string
selectors apply to containers only: a Tensor output is kept as it is, so ``select=0`` takes the hidden states of a
Hugging Face layer whichever of the two it returns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .._checks import FineregIndexError, FineregTypeError, UnknownNameError
from .._utils import get_submodule, name_list, unknown_name_error, unwrap

__all__ = ["FeatureCapture", "Selector"]

Selector = int | str | Callable[[Any], Any] | None


def _check_selector(sel: Any, where: str) -> Selector:
    if sel is None or callable(sel) or (isinstance(sel, (int, str)) and not isinstance(sel, bool)):
        return sel
    raise FineregTypeError(
        f"{where}: a selector is None, an int (position in a tuple), a str (key of a dict / "
        f"ModelOutput) or a callable output -> value; got {type(sel).__name__} {sel!r}"
    )


def _apply_selector(sel: Selector, output: Any, name: str) -> Any:
    if sel is None or isinstance(output, Tensor) and not callable(sel):
        return output
    if callable(sel):
        return sel(output)
    kind = type(output).__name__
    if isinstance(sel, int):
        seq = output.to_tuple() if hasattr(output, "to_tuple") else output
        if not isinstance(seq, (tuple, list)):
            raise FineregTypeError(
                f"module {name!r} returned a {kind}; select={sel} picks a position in a tuple/list "
                f"output; pass a str key or a callable instead"
            )
        if not -len(seq) <= sel < len(seq):
            raise FineregIndexError(
                f"module {name!r} returned a {kind} of {len(seq)} items; select={sel} is out of range"
            )
        return seq[sel]
    if isinstance(output, Mapping):
        if sel not in output:
            raise unknown_name_error(f"key in the output of module {name!r}", sel, list(output.keys()))
        return output[sel]
    if hasattr(output, sel):
        return getattr(output, sel)
    raise FineregTypeError(
        f"module {name!r} returned a {kind} with no key or attribute {sel!r}; "
        f"pass an int position or a callable selector instead"
    )


class FeatureCapture:
    """Keep the latest output of named submodules of ``model``, by persistent forward hooks.

    Args:
        model: the network; DistributedDataParallel / DataParallel / ``torch.compile`` wrappers are looked through
            (register the capture before the first call of a compiled model, so that the compiled code runs the hooks).
        names: module names as in ``model.named_modules()`` (a ``module.`` / ``_orig_mod.`` prefix is accepted);
            ``outputs`` keeps this order. An unknown name raises a KeyError listing close matches.
        select: one selector for every module, or a mapping ``name -> selector`` (names left out keep the raw output).
            See the module docstring.
        detach: store ``output.detach()`` (for a frozen source model whose features are targets, not graph nodes).

    After each forward of ``model`` the outputs of that forward are available as ``cap.outputs`` (an OrderedDict in
    the order of ``names``; a module that did not run is missing) or ``cap[name]``. The hooks are removed by
    :meth:`close` or at the end of a ``with`` block. A module called several times in one forward keeps its last
    output (as tllib). Outputs keep their autograd graph (unless ``detach``) until the next forward or :meth:`clear`.
    """

    def __init__(
        self,
        model: nn.Module,
        names: str | Iterable[str],
        select: Selector | Mapping[str, Selector] = None,
        *,
        detach: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise FineregTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        names = name_list(
            names, "module names", "the names of the submodules whose outputs to capture, e.g. ['layer3', 'layer4']"
        )
        modules = {n: get_submodule(model, n) for n in names}  # KeyError with close matches
        if isinstance(select, Mapping):
            for key in select:
                if key not in modules:
                    raise unknown_name_error("captured module", key, names, hint="(keys of select must be in names)")
            selectors = {n: _check_selector(select.get(n), f"select[{n!r}]") for n in names}
        else:
            sel = _check_selector(select, "select")
            selectors = dict.fromkeys(names, sel)
        self.names: tuple[str, ...] = tuple(names)
        self.detach = bool(detach)
        self.model = model
        self._selectors = selectors
        self._outputs: dict[str, Any] = {}
        root = unwrap(model)
        self._handles = [root.register_forward_pre_hook(self._on_root_forward)]
        self._handles += [m.register_forward_hook(self._make_hook(n)) for n, m in modules.items()]

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = _apply_selector(self._selectors[name], output, name)
            if self.detach:
                value = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, value)
            self._outputs[name] = value

        return hook

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        self._outputs.clear()

    @property
    def outputs(self) -> OrderedDict[str, Any]:
        """The outputs of the last forward, ``name -> output`` in the order of ``names``."""
        return OrderedDict((n, self._outputs[n]) for n in self.names if n in self._outputs)

    def __getitem__(self, name: str) -> Any:
        if name not in self._selectors:
            raise unknown_name_error("captured module", name, self.names)
        if name not in self._outputs:
            raise UnknownNameError(
                f"module {name!r} produced no output since the last forward of the model (was the model "
                f"run after the capture was created, and does its forward use this module? A "
                f"torch.compile'd model runs only the hooks that existed at its first call)"
            )
        return self._outputs[name]

    def __len__(self) -> int:
        return len(self._outputs)

    def __contains__(self, name: object) -> bool:
        return name in self._outputs

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[OrderedDict[str, Any], Any]:
        """Run the model on ``(*args, **kwargs)`` and return ``(outputs, model_output)``."""
        if self.closed:
            raise RuntimeError("this FeatureCapture is closed; create a new one")
        out = self.model(*args, **kwargs)
        return self.outputs, out

    def clear(self) -> None:
        """Drop the stored outputs (and the autograd graphs they keep alive)."""
        self._outputs.clear()

    @property
    def closed(self) -> bool:
        return not self._handles

    def close(self) -> None:
        """Remove the hooks and drop the stored outputs; calling it again does nothing."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._outputs.clear()

    def __enter__(self) -> FeatureCapture:
        if self.closed:
            raise RuntimeError("this FeatureCapture is closed; create a new one")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"FeatureCapture(names={list(self.names)}, detach={self.detach}, {state})"
