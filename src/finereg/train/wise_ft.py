"""``finereg wise-ft RUN``: WiSE-FT (Wortsman et al., CVPR 2022) as a post-hoc step on a finished run.

For each α of the sweep (default 0, 0.1, ..., 1)::

    θ(α) = (1 − α)·θ0 + α·θ1                 (:func:`finereg.wise_ft`: floating entries; integer buffers from θ1)

* θ0 = the pretrained network rebuilt from the run's config (``arch``, ``weights``; the built-in source model on
  the digits task). The engine's networks have no zero-shot head (their source head classifies the source
  classes), so θ0's head is the linear probe of the pretrained features of the run's training set
  (:func:`~finereg.train.probe.probe_head`, λ chosen on the validation split or a holdout of the training
  features), as the WiSE-FT paper does for models without a zero-shot head.
* θ1 = the run's fine-tuned network (the checkpoint's ``net``). The run must be finished (no step pending).
* BatchNorm: for 0 < α < 1 the running statistics are recomputed on the training images (evaluation view,
  ``torch.optim.swa_utils.update_bn``) where the network has BatchNorm; the end points keep their own, so α = 0
  is θ0 and α = 1 is θ1 exactly.
* Each θ(α) is evaluated on the run's ``valid``, ``test`` and ``shift`` splits (those the data has). α is chosen
  by validation top-1 (ties: the larger α, nearer the fine-tuned network), never on the test split; a run without
  a validation split gets every α reported and none chosen.

Written to ``RUN/wise_ft.csv`` (one row per α), ``RUN/wise_ft.json`` (rows, choice, reason, θ0's probe) and, where
an α is chosen, ``RUN/wise_ft.pt``: the chosen merged network as a finereg checkpoint (the run's config and
classes, ``net`` = θ(α), ``wise_ft`` = the choice), which ``finereg.train.load_trained`` loads; atomically, while
the run directory's lock is held (a run being trained is refused). ``fit --overwrite`` removes all three.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from .._checks import FineregError, check_number
from ..merge import DEFAULT_ALPHAS, wise_ft
from ..merge._state import has_batchnorm, load_merged
from .build import build_task
from .checkpoint import FORMAT, LAST, atomic_save, find_checkpoint, load_checkpoint
from .config import PATH_FIELDS
from .data import derive_seed
from .dist import _pick_device
from .loop import FitConfig, _torch_state, evaluate
from .metrics import write_text_atomic
from .probe import probe_head
from .run_dir import WISE_FT_FILES, DirLock, RunDir

__all__ = ["WiseFTResult", "wise_ft_run", "CSV_NAME", "JSON_NAME", "MODEL_NAME"]

CSV_NAME, JSON_NAME, MODEL_NAME = WISE_FT_FILES
SELECT = "valid_top1"


@dataclass
class WiseFTResult:
    """The sweep of a run: one row of metrics per α, the α chosen on validation (or None, and why)."""

    run_dir: Path
    rows: list[dict]
    chosen_alpha: float | None
    reason: str
    theta0: dict = field(default_factory=dict)  # how θ0's head was made (the probe's λ and held-out accuracy)
    state: dict | None = field(default=None, repr=False)  # the chosen θ(α) (BatchNorm statistics as evaluated)

    @property
    def chosen(self) -> dict | None:
        return next((r for r in self.rows if r["alpha"] == self.chosen_alpha), None)


class _TrainImages:
    """The training images (evaluation view) as batches of inputs, re-iterable (for ``update_bn``)."""

    def __init__(self, images, batch_size: int, device: torch.device):
        self.images, self.batch_size, self.device = images, batch_size, device

    def __iter__(self) -> Iterator[Tensor]:
        return (b.x for b in self.images.eval_batches(self.batch_size, self.device) if b.y.numel())


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    out = [check_number(a, "each of --alphas", low=0, high=1) for a in alphas]
    if not out:
        raise FineregError("--alphas is empty: give the α values to try, e.g. 0,0.25,0.5,0.75,1")
    return list(dict.fromkeys(out))


def wise_ft_run(
    run: str | os.PathLike,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> WiseFTResult:
    """The WiSE-FT sweep of the finished run in ``run`` (a run directory, whose ``last.pt`` is swept, or a
    checkpoint in one, swept itself), written to ``wise_ft.csv`` / ``wise_ft.json`` there (see the module
    docstring). ``cache_dir``: finereg's cache, as ``fit``'s (default ``$FINEREG_CACHE`` or ``~/.cache/finereg``;
    never the one stored in the run's config)."""
    alphas = _check_alphas(alphas)
    run_dir = RunDir.folder_of(run)
    named = _checkpoint_of(run)  # the clear error for a path without a run, before the lock file is made
    with DirLock(run_dir):
        ckpt = load_checkpoint(named, command="wise-ft")
        if named.name != LAST:
            log(f"wise-ft: sweeping {named} (epoch {ckpt['epoch']})")
        cfg = ckpt["config"]
        if ckpt["epoch"] < cfg["epochs"] or ckpt["step"]:
            advice = f"finish it with finereg fit --resume {run_dir}, then run wise-ft"
            if named.name != LAST and (run_dir / LAST).is_file():
                advice = f"sweep the run's last checkpoint: finereg wise-ft {run_dir}"
            raise FineregError(
                f"the {'run in ' + repr(str(run_dir)) if named.name == LAST else 'checkpoint ' + repr(str(named))} "
                f"is not finished (epoch {ckpt['epoch']} of {cfg['epochs']}"
                f"{', step ' + str(ckpt['step']) if ckpt['step'] else ''}): {advice}"
            )
        if cfg["weights"] in ("none", "scratch"):
            raise FineregError(
                f"the run in {str(run_dir)!r} started from random weights (--weights {cfg['weights']}): WiSE-FT "
                "interpolates towards the pretrained weights, which it has none of"
            )
        dev = _pick_device(device, 0)
        known = {f.name for f in fields(FitConfig)}
        run_cfg = FitConfig(**{k: v for k, v in cfg.items() if k in known and k not in PATH_FIELDS})
        run_cfg.cache_dir = None if cache_dir is None else str(cache_dir)  # paths: this command's, not the run's
        batch = batch_size or max(run_cfg.batch_size, 256)  # the epochs' evaluation batch (loop._train)
        with _torch_state(run_cfg, dev):  # the run's thread count and deterministic algorithms
            result = _sweep(run_dir, run_cfg, ckpt, alphas, dev, batch, log)
        _write(result, ckpt)
    if result.state is not None:
        log(f"wise-ft: the network of alpha {result.chosen_alpha:g} in {run_dir / MODEL_NAME} (load_trained loads it)")
    return result


def _checkpoint_of(run: str | os.PathLike) -> Path:
    """The checkpoint ``run`` names: the file itself, or a run directory's ``last.pt`` (else ``prev.pt``)."""
    return find_checkpoint(Path(run).expanduser(), command="wise-ft")


def _sweep(
    run_dir: Path, cfg: FitConfig, ckpt: dict, alphas: list[float], device, batch_size: int, log
) -> WiseFTResult:
    with torch.random.fork_rng(devices=[]):  # the run's data and pretrained network, as fit built them
        torch.manual_seed(derive_seed(cfg.seed, 0xC0FFEE))
        data, bundle = build_task(cfg, log)
    if list(data.classes) != list(ckpt["classes"]):
        raise FineregError(
            f"the data {cfg.data!r} now has classes {data.classes[:5]}..., the run was trained on "
            f"{ckpt['classes'][:5]}...: the run's data changed since"
        )
    n = len(data.classes)
    model = bundle.net.to(device).eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    probe = probe_head(model, data, batch_size, device, seed=cfg.seed, log=log)
    probe.load_into(model.head)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    theta1 = {k: v.to(device) for k, v in ckpt["net"].items()}
    bn = _TrainImages(data.train, batch_size, device) if has_batchnorm(model) else None
    rows, best, state = [], None, None
    for a in alphas:
        load_merged(model, wise_ft(theta0, theta1, a), bn if 0 < a < 1 else None)
        row: dict = {"alpha": a}
        for prefix, images in data.evaluation_sets().items():
            row.update(evaluate(model, images, batch_size, device, n, prefix=prefix))
        rows.append(row)
        if data.valid is not None and (best is None or (row[SELECT], a) > (best[SELECT], best["alpha"])):
            best, state = row, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log(f"wise-ft: alpha {a:g}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k.endswith("top1")))
    chosen = None
    reason = (
        f"{cfg.data!r} has no validation split, and α is never chosen on the test split: every α is reported, none "
        "chosen (add ROOT/valid/<class>/<image> to choose one)"
    )
    if best is not None:  # the largest validation top-1; of equal ones the largest α (nearer the fine-tuned end)
        chosen, reason = best["alpha"], f"chosen on the validation split (the largest {SELECT}; ties: the larger α)"
    made = {
        "head": "linear probe of the pretrained features",
        "l2": probe.l2,
        "heldout_accuracy": probe.val_accuracy,
        "batchnorm_recomputed": bn is not None,
    }
    return WiseFTResult(run_dir, rows, chosen, reason, made, state)


def _write(result: WiseFTResult, ckpt: dict) -> None:
    keys = ["alpha", *sorted({k for r in result.rows for k in r} - {"alpha"}), "chosen"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({**r, "chosen": int(r["alpha"] == result.chosen_alpha)})
    write_text_atomic(result.run_dir / CSV_NAME, buf.getvalue())
    doc = {
        "alphas": [r["alpha"] for r in result.rows],
        "rows": result.rows,
        "chosen_alpha": result.chosen_alpha,
        "selected_on": SELECT if result.chosen_alpha is not None else None,
        "reason": result.reason,
        "theta0": result.theta0,
        "theta1": {"epochs": ckpt["epoch"], "method": ckpt["config"]["method"]},
    }
    write_text_atomic(result.run_dir / JSON_NAME, json.dumps(doc, indent=2) + "\n")
    model = result.run_dir / MODEL_NAME
    if result.state is None:  # no α chosen: no merged model (and none of an earlier sweep left behind)
        model.unlink(missing_ok=True)
        return
    choice = {"alpha": result.chosen_alpha, "selected_on": SELECT, "row": result.chosen, "theta0": result.theta0}
    kept = {k: ckpt[k] for k in ("config", "classes", "epoch", "step")}
    atomic_save({"format": FORMAT, **kept, "net": result.state, "wise_ft": choice}, model)
