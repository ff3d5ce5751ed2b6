"""Bi-Tuning (Zhong, Wang, Long et al., "Bi-tuning of Pre-trained Representations", arXiv:2011.06182, 2020).

Bi-Tuning fine-tunes with a classifier head and a projector head, each with a contrastive loss over per-class
queues of keys from a momentum key encoder (MoCo style):

* the query encoder q returns y (class logits), z = normalize(projector(h)) and ĥ = normalize([h, 1]);
  the key encoder k is a copy of q updated by momentum, θ_k ← m·θ_k + (1 − m)·θ_q, before each forward;
* queues: ``queue_z`` (P, C, K) of projected keys and ``queue_h`` (F+1, C, K) of feature keys, K per class,
  each with a pointer ``queue_ptr`` (C). Each sample's key enters its own class's queue at that class's
  pointer, in batch order (and, under DDP, the keys of all ranks in rank order);
* projector contrast (uses the queue *before* this batch is enqueued): for a sample of class c,

      logits_z = [z_q·z_k, z_q·Q_z[c, :], z_q·Q_z[c' ≠ c, :]] / T            (1 + C·K values)

* classifier contrast (uses the queue *after* this batch is enqueued, as tllib does): with
  w_c = normalize([W_c, b_c]) the class-c row of the head, **detached** (tllib reads ``head.weight.data``),

      logits_y = [ĥ_q·w_c, Q_h[c, :]·w_c, Q_h[c' ≠ c, :]·w_c] / T

  both log-softmaxed; the contrastive target ``labels_c`` puts 1/(K+1) on the first K+1 entries (the
  positives). The training loss is CE(y_q, labels) + λ·(KL(labels_c‖logits_z) + KL(labels_c‖logits_y)).

Negatives are ordered class 0..C-1 without c, K each, in queue order (tllib's layout: its outputs and training
trajectory are reproduced, golden test). Any batch size: a batch with more than K samples of a class keeps the
last K of them, what sequential enqueuing leaves. Under DDP the keys of all ranks are gathered before enqueuing.
How this differs from tllib's implementation, and its speed: docs/head_methods.md.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import FineregError, FineregTypeError, check_choice, check_int, check_number
from .._deprecate import renamed, renamed_attribute
from .._utils import class_ranks, unwrap
from ..lr_policy import ROLES, Role, param_groups
from ._contrast import contrast_log_softmax

__all__ = ["BiTuningClassifier", "BiTuning", "bi_tuning_loss"]


class BiTuningClassifier(nn.Module):
    """Query/key encoder for Bi-Tuning: backbone → (pool) → (bottleneck) → h; returns in training mode
    ``(y, z, ĥ)`` with y = head(h), z = normalize(projector(h)), ĥ = normalize([h, 1]); in eval mode y.

    Args:
        backbone: maps inputs to features (after ``pool``); ``features_dim`` defaults to its ``out_features``.
        num_classes: number of classes C.
        projection_dim: output size P of the projector (default 128).
        features_dim: feature size F of h (default: ``bottleneck_dim`` or ``backbone.out_features``).
        pool: module applied after the backbone (default: none).
        bottleneck: optional module after ``pool``; then give ``bottleneck_dim``.
        bottleneck_dim: output size of ``bottleneck``.

    The head is ``Linear(F, C)`` initialized N(0, 0.01²) with zero bias, the projector ``Linear(F, P)`` (tllib).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        projection_dim: int = 128,
        *,
        features_dim: int | None = None,
        pool: nn.Module | None = None,
        bottleneck: nn.Module | None = None,
        bottleneck_dim: int | None = None,
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise FineregTypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        num_classes = check_int(num_classes, "num_classes", low=1)
        projection_dim = check_int(projection_dim, "projection_dim", low=1)
        if bottleneck is not None:
            features_dim = check_int(bottleneck_dim, "bottleneck_dim (the bottleneck's output size)", low=1)
        if features_dim is None:
            features_dim = getattr(backbone, "out_features", None)
            if not isinstance(features_dim, int):
                raise FineregError(
                    "cannot tell the feature size: give features_dim=... (or a backbone with an "
                    "int attribute out_features)"
                )
        self.backbone = backbone
        self.pool_layer = nn.Identity() if pool is None else pool
        self.bottleneck = nn.Identity() if bottleneck is None else bottleneck
        self.head = nn.Linear(features_dim, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)
        self.projector = nn.Linear(features_dim, projection_dim)
        self.num_classes = num_classes
        self.projection_dim = projection_dim
        self._features_dim = features_dim

    @property
    def features_dim(self) -> int:
        """Size F of the features h fed to the head (the queue_h rows are F + 1)."""
        return self._features_dim

    def param_parts(self, projector: Role = "pretrained") -> dict[str, Role]:
        """The parts and their learning-rate roles (:mod:`finereg.lr_policy`): the backbone (and a pool with
        parameters) pretrained, the bottleneck and head new, the projector ``projector`` (``"pretrained"``:
        tllib's layout, which trains the new projector at the backbone's rate; ``"new"``: at the head's)."""
        parts: dict[str, Role] = {"backbone": "pretrained"}
        if any(True for _ in self.pool_layer.parameters()):
            parts["pool_layer"] = "pretrained"
        parts.update(bottleneck="new", head="new", projector=check_choice(projector, "projector", ROLES))
        return parts

    def param_groups(self, lr: float, *, pretrained_lr_mult: float = 0.1, projector: Role = "pretrained") -> list[dict]:
        """Optimizer groups: :func:`finereg.lr_policy.param_groups` of :meth:`param_parts`."""
        return param_groups(self, lr, self.param_parts(projector), pretrained_lr_mult=pretrained_lr_mult)

    def features(self, x: Tensor) -> Tensor:
        return self.bottleneck(self.pool_layer(self.backbone(x)))

    def forward(self, x: Tensor):
        h = self.features(x)
        y = self.head(h)
        if not self.training:
            return y
        z = F.normalize(self.projector(h), dim=1)
        hn = F.normalize(torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1), dim=1)
        return y, z, hn


_ARG = inspect.Parameter.POSITIONAL_OR_KEYWORD
_SIGNATURE_0_1 = inspect.Signature(
    [inspect.Parameter(n, _ARG) for n in ("y_q", "logits_z", "logits_y", "labels_c", "labels")]
    + [inspect.Parameter("trade_off", _ARG, default=1.0)]
)


def _takes_the_0_1_form(fn):
    """finereg 0.1's ``bi_tuning_loss(y_q, logits_z, logits_y, labels_c, labels, trade_off=1.0)`` (the whole
    objective) keeps working until 0.3, with a ``FutureWarning`` (README, Conventions; CHANGELOG.md)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if len(args) < 5 and not {"y_q", "labels", "trade_off"} & kwargs.keys():
            return fn(*args, **kwargs)
        try:
            a = _SIGNATURE_0_1.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise FineregTypeError(f"bi_tuning_loss(logits_z, logits_y, labels_c): {e}") from None
        warnings.warn(
            "bi_tuning_loss(y_q, logits_z, logits_y, labels_c, labels, trade_off) is now bi_tuning_loss(logits_z, "
            "logits_y, labels_c), the contrastive term alone (changed in finereg 0.2); the old form works until "
            "finereg 0.3: write F.cross_entropy(y_q, labels) + trade_off * bi_tuning_loss(logits_z, logits_y, "
            "labels_c)",
            FutureWarning,
            stacklevel=2,
        )
        term = fn(a["logits_z"], a["logits_y"], a["labels_c"])
        return F.cross_entropy(a["y_q"], a["labels"]) + a.get("trade_off", 1.0) * term

    return wrapper


@_takes_the_0_1_form
def bi_tuning_loss(logits_z: Tensor, logits_y: Tensor, labels_c: Tensor) -> Tensor:
    """Bi-Tuning's contrastive term KL_batchmean(labels_c ‖ logits_z) + KL_batchmean(labels_c ‖ logits_y)
    (``logits_*`` are the log-probabilities :class:`BiTuning` returns). Like every output loss here it carries no
    coefficient: tllib's objective is ``F.cross_entropy(y_q, labels) + trade_off * bi_tuning_loss(...)``.

    KL(t ‖ ·) of a batch is (Σ t·log t − Σ t·logits) / b: the entropy part is computed once for both terms and each
    cross part is one dot product (``F.kl_div`` gives the same value, to rounding, in several passes); float16 /
    bfloat16 inputs are summed in float32.
    """
    if logits_z.shape != labels_c.shape or logits_y.shape != labels_c.shape or labels_c.dim() != 2:
        raise FineregError(
            f"logits_z {tuple(logits_z.shape)}, logits_y {tuple(logits_y.shape)} and labels_c "
            f"{tuple(labels_c.shape)} must have the same (batch, 1 + C·K) shape, as BiTuning returns them"
        )
    b = labels_c.shape[0]
    if b == 0:
        raise FineregError("bi_tuning_loss got an empty batch: its batch mean is undefined; skip empty batches")
    dtype = torch.promote_types(torch.promote_types(logits_z.dtype, logits_y.dtype), labels_c.dtype)
    if dtype in (torch.float16, torch.bfloat16):  # sums of b·(1 + C·K) terms: accumulate in float32
        dtype = torch.float32
    t = labels_c.reshape(-1).to(dtype)
    cross = torch.dot(t, logits_z.reshape(-1).to(dtype)) + torch.dot(t, logits_y.reshape(-1).to(dtype))
    return (2 * torch.xlogy(t, t).sum() - cross) / b


def _gather_from_all_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor over all ranks (rank order) along dim 0; batch sizes may differ per rank."""
    world = dist.get_world_size()
    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((top, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes)]))
    return tuple(out)


class BiTuning(nn.Module):
    """Bi-Tuning: per-class key queues and a momentum key encoder around a :class:`BiTuningClassifier`.

    ``forward(im_q, im_k, labels)`` → ``(y_q, logits_z, logits_y, labels_c)`` with shapes (b, C),
    (b, 1 + C·K) twice and (b, 1 + C·K); see the module docstring for the formulas and
    :func:`bi_tuning_loss` for the objective. In eval mode, or without ``im_k``, call ``encoder_q`` directly.

    Args:
        encoder_q: query encoder (with ``head`` a ``Linear``, ``features_dim``, ``projection_dim``).
        encoder_k: key encoder of the same architecture (default: a deep copy of ``encoder_q``). Its parameters
            are overwritten with ``encoder_q``'s and frozen (momentum updates only).
        num_classes: C (default: ``encoder_q.head.out_features``).
        K: keys per class (default 40).
        m: momentum of the key encoder (default 0.999).
        temperature: T of the contrasts (default 0.07).
        gather_keys: under an initialized process group with several ranks, enqueue the keys of all ranks
            (all_gather, rank order), so every rank keeps the same queues (default True).

    Buffers (tllib's names and layouts, so tllib checkpoints load): ``queue_h`` (F+1, C, K), ``queue_z``
    (P, C, K), both initialized with normalized Gaussian columns, and ``queue_ptr`` (C,) int64.
    """

    queue_h: Tensor
    queue_z: Tensor
    queue_ptr: Tensor
    T = renamed_attribute("T", "temperature", since="0.2")

    @renamed(T="temperature", since="0.2")
    def __init__(
        self,
        encoder_q: nn.Module,
        encoder_k: nn.Module | None = None,
        num_classes: int | None = None,
        K: int = 40,  # noqa: N803 -- the paper's name
        m: float = 0.999,
        temperature: float = 0.07,
        *,
        gather_keys: bool = True,
    ):
        super().__init__()
        if not isinstance(encoder_q, nn.Module):
            raise FineregTypeError(f"encoder_q must be an nn.Module, got {type(encoder_q).__name__}")
        inner = unwrap(encoder_q)
        head = getattr(inner, "head", None)
        if not isinstance(head, nn.Linear):
            raise FineregTypeError(
                "encoder_q.head must be an nn.Linear (the classifier, read by the contrast on "
                "logits_y); use BiTuningClassifier"
            )
        for attr in ("features_dim", "projection_dim"):
            if not isinstance(getattr(inner, attr, None), int):
                raise FineregTypeError(f"encoder_q needs an int attribute {attr} (use BiTuningClassifier)")
        if num_classes is None:
            num_classes = head.out_features
        if not isinstance(num_classes, int) or num_classes < 1 or num_classes != head.out_features:
            raise FineregError(
                f"num_classes ({num_classes!r}) must be a positive int equal to the head's "
                f"out_features ({head.out_features})"
            )
        if head.in_features != inner.features_dim:
            raise FineregError(
                f"encoder_q.features_dim ({inner.features_dim}) must match the head's in_features ({head.in_features})"
            )
        K = check_int(K, "K (keys per class)", low=1)
        m = check_number(m, "m (the key encoder's momentum)", low=0, high=1)
        temperature = check_number(temperature, "temperature", low=0, low_open=True)
        if encoder_k is None:
            encoder_k = copy.deepcopy(encoder_q)
        q_params, k_params = list(encoder_q.parameters()), list(encoder_k.parameters())
        if len(q_params) != len(k_params) or any(a.shape != b.shape for a, b in zip(q_params, k_params)):
            raise FineregError("encoder_k must have the same architecture (parameter shapes) as encoder_q")
        self.encoder_q, self.encoder_k = encoder_q, encoder_k
        with torch.no_grad():
            for pq, pk in zip(q_params, k_params):
                pk.copy_(pq)
                pk.requires_grad_(False)
        self.K, self.m, self.temperature, self.num_classes = K, float(m), temperature, num_classes
        self.gather_keys = gather_keys
        self.register_buffer("queue_h", F.normalize(torch.randn(inner.features_dim + 1, num_classes, K), dim=0))
        self.register_buffer("queue_z", F.normalize(torch.randn(inner.projection_dim, num_classes, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    def param_parts(self, projector: Role = "pretrained") -> dict[str, Role]:
        """The query encoder's parts (:meth:`BiTuningClassifier.param_parts`); the key encoder is excluded (it
        follows the query encoder by momentum)."""
        inner = unwrap(self.encoder_q)
        declare = getattr(inner, "param_parts", None)
        if not callable(declare):
            raise FineregError(f"{type(inner).__name__} declares no param_parts(); use a BiTuningClassifier")
        prefix = "encoder_q." if inner is self.encoder_q else "encoder_q.module."
        parts: dict[str, Role] = {prefix + k: v for k, v in declare(projector=projector).items()}
        parts["encoder_k"] = "excluded"
        return parts

    def param_groups(self, lr: float, *, pretrained_lr_mult: float = 0.1, projector: Role = "pretrained") -> list[dict]:
        """Optimizer groups of the query encoder (:meth:`param_parts`); tllib's script passes
        ``encoder_q.get_parameters(lr)``, the same groups."""
        return param_groups(self, lr, self.param_parts(projector), pretrained_lr_mult=pretrained_lr_mult)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, K={self.K}, m={self.m}, temperature={self.temperature}"

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q for every parameter (buffers are not touched, as in tllib/MoCo)."""
        ks = [p.data for p in self.encoder_k.parameters()]
        qs = [p.data for p in self.encoder_q.parameters()]
        torch._foreach_mul_(ks, self.m)
        torch._foreach_add_(ks, qs, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, h: Tensor, z: Tensor, labels: Tensor) -> None:
        """Write each key into its class's queue at that class's pointer, in order, and advance the pointers.

        Equivalent to enqueuing the samples one by one: sample i of class c goes to slot
        (ptr[c] + r_i) mod K where r_i counts the earlier samples of class c in the batch; when a class has more
        than K samples only its last K are written (the earlier ones would be overwritten), so every slot is
        written at most once and the scatter is deterministic.
        """
        n = labels.shape[0]
        if n == 0:
            return
        counts = torch.bincount(labels, minlength=self.num_classes)
        rank = class_ranks(labels, self.num_classes)
        keep = rank >= counts[labels] - self.K
        c, slot = labels[keep], (self.queue_ptr[labels[keep]] + rank[keep]) % self.K
        self.queue_h[:, c, slot] = h[keep].T.to(self.queue_h.dtype)
        self.queue_z[:, c, slot] = z[keep].T.to(self.queue_z.dtype)
        self.queue_ptr.copy_((self.queue_ptr + counts) % self.K)

    def forward(self, im_q: Tensor, im_k: Tensor, labels: Tensor):
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise FineregError("labels must be a 1-D integer tensor")
        b = labels.shape[0]
        if im_q.shape[0] != b or im_k.shape[0] != b:
            raise FineregError(
                f"im_q, im_k and labels must have the same batch size, got {im_q.shape[0]}, {im_k.shape[0]} and {b}"
            )
        if b and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise FineregError(
                f"labels must be in 0..{self.num_classes - 1}, got range [{int(labels.min())}, {int(labels.max())}]"
            )
        labels = labels.long()
        C, K = self.num_classes, self.K
        out = self.encoder_q(im_q)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise FineregError(
                "encoder_q must return (y, z, hn) (a BiTuningClassifier in training mode); for "
                "predictions in eval mode call encoder_q directly"
            )
        y_q, z_q, h_q = out
        with torch.no_grad():
            self._momentum_update_key_encoder()
            _, z_k, h_k = self.encoder_k(im_k)

        inv_t = 1.0 / self.temperature  # folded into the small operands of the two queue products

        # projector contrast against the queue as it was before this batch
        queue_z = self.queue_z.detach()
        if z_q.requires_grad:  # autograd keeps the operand; the in-place enqueue below must not change it
            queue_z = queue_z.clone()
        pos_z = (z_q * z_k).sum(1) * inv_t
        scores_z = (z_q * inv_t) @ queue_z.flatten(1)  # (b, C·K)
        logits_z = contrast_log_softmax(pos_z, scores_z, labels, C)

        keys_h, keys_z, key_labels = h_k, z_k, labels
        if self.gather_keys and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            keys_h, keys_z, key_labels = _gather_from_all_ranks(h_k, z_k, labels)
        self._dequeue_and_enqueue(keys_h, keys_z, key_labels)

        # classifier contrast (head rows detached) against the queue after this batch
        head = unwrap(self.encoder_q).head
        present, inverse = torch.unique(labels, return_inverse=True)  # each present class's row, once
        bias = head.bias.detach()[present] if head.bias is not None else head.weight.new_zeros(len(present))
        w = F.normalize(torch.cat([head.weight.detach()[present], bias[:, None]], dim=1), dim=1)  # (u, F+1)
        pos_y = (h_q * w[inverse]).sum(1) * inv_t
        scores_y = (w * inv_t) @ self.queue_h.detach().flatten(1)  # (u, C·K)
        logits_y = contrast_log_softmax(pos_y, scores_y, labels, C, rows=inverse)

        labels_c = logits_z.new_zeros(b, 1 + C * K)
        labels_c[:, : K + 1] = 1.0 / (K + 1)
        return y_q, logits_z, logits_y, labels_c
