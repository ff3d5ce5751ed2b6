"""The shared set-up of the integration tests: real MiniLM, the docstring task, the reference plain loop.

The reference is finereg used by hand, as the README quickstart does (``finereg.L2SP``, ``FeatureCapture`` +
``behavioral_penalty``, ``BSS``, ``kd_loss`` in a plain PyTorch loop); the Trainer and Lightning runs must give
its weights. Dropout is 0 (the runs draw random numbers in different orders) and the batches are taken in order.
"""

from __future__ import annotations

import copy
import os

import torch

import finereg
from finereg.integrations import BSSTerm, DeltaTerm, KDTerm, L2SPTerm, Term
from finereg.integrations.minilm import SentenceClassifier, load_tokenizer
from finereg.integrations.text_task import TokenizedSplit, stdlib_docstrings, tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS = ["encoder.encoder.layer.2", "encoder.encoder.layer.5"]
LR = 0.005
MOMENTUM = 0.9
# the coefficients of the reference methods (DELTA sums over batch x tokens x 384 values: a small trade-off)
COEF = {"l2sp": 0.01, "delta": 1e-3, "bss": 1e-3, "kd": 0.5, "temperature": 2.0}


def base_model() -> SentenceClassifier:
    """MiniLM with a seeded new head, dropout 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SentenceClassifier.from_minilm(len(stdlib_docstrings().labels), dropout=0.0)


def train_data(n: int = 16, max_length: int = 16) -> TokenizedSplit:
    return tokenize(stdlib_docstrings().train[:n], load_tokenizer(), max_length=max_length)


def make_terms(methods: tuple[str, ...]) -> list[Term]:
    """The integration terms of ``methods`` (names of :data:`COEF`), with the reference coefficients."""
    out: list[Term] = []
    if "l2sp" in methods:
        out.append(L2SPTerm(COEF["l2sp"], COEF["l2sp"]))
    if "delta" in methods:
        out.append(DeltaTerm(LAYERS, COEF["delta"]))
    if "bss" in methods:
        out.append(BSSTerm("pooler", COEF["bss"]))
    if "kd" in methods:
        out.append(KDTerm(COEF["kd"], COEF["temperature"]))
    return out


def plain_run(
    base: torch.nn.Module,
    data: TokenizedSplit,
    methods: tuple[str, ...],
    steps: int,
    batch: int = 16,
    autocast: torch.dtype | None = None,
):
    """The reference: ``steps`` SGD steps over the batches in order, finereg's modules by hand (the forward passes
    under ``torch.autocast("cpu", autocast)`` when given; the penalties on float32 features)."""
    import contextlib

    model, source = copy.deepcopy(base).train(), copy.deepcopy(base).eval().requires_grad_(False)
    l2sp = finereg.L2SP(model, anchor=source, alpha=COEF["l2sp"], beta=COEF["l2sp"])
    source_feats = finereg.FeatureCapture(source, LAYERS, select=0, detach=True)
    target_feats = finereg.FeatureCapture(model, [*LAYERS, "pooler"], select=0)
    bss = finereg.BSS(k=1)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    n = len(data)
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % n
        inputs = {k: v[idx] for k, v in data.tensors.items()}
        amp = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with amp:
            out = model(**inputs)
            with torch.no_grad():
                teacher = source(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        feats = {k: v.float() for k, v in target_feats.outputs.items()}
        source_outputs = {k: v.float() for k, v in source_feats.outputs.items()}
        loss = out.loss
        if "l2sp" in methods:
            loss = loss + l2sp()
        if "delta" in methods:
            loss = loss + COEF["delta"] * finereg.behavioral_penalty(source_outputs, {k: feats[k] for k in LAYERS})
        if "bss" in methods:
            loss = loss + COEF["bss"] * bss(feats["pooler"])
        if "kd" in methods:
            loss = loss + COEF["kd"] * finereg.kd_loss(out.logits.float(), teacher.float(), COEF["temperature"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    source_feats.close()
    target_feats.close()
    return model


def hf_args(out: str, **kw):
    """TrainingArguments of a deterministic CPU run: SGD with momentum, constant learning rate, no clipping,
    batches in order."""
    import transformers

    cfg = dict(
        output_dir=out,
        per_device_train_batch_size=16,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        optim="sgd",
        optim_args=f"momentum={MOMENTUM}",
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    cfg.update(kw)
    return transformers.TrainingArguments(**cfg)


def hf_run(base: torch.nn.Module, data: TokenizedSplit, terms: list[Term], steps: int, out: str, **kw):
    """``steps`` optimizer steps of a FineregTrainer; returns (model, trainer)."""
    from finereg.integrations.transformers import FineregTrainer

    model = copy.deepcopy(base)
    trainer = FineregTrainer(
        model=model, args=hf_args(out, max_steps=steps, **kw), train_dataset=data, regularizers=terms
    )
    trainer.train()
    return model, trainer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


class TinyClassifier(torch.nn.Module):
    """A small token classifier with MiniLM's interface (for the fast tests of errors and plumbing)."""

    def __init__(self, vocab: int = 50, dim: int = 8, labels: int = 3):
        super().__init__()
        from finereg.integrations.minilm import MeanPooling

        self.embed = torch.nn.Embedding(vocab, dim)
        self.layer = torch.nn.Linear(dim, dim)
        self.pooler = MeanPooling()
        self.head = torch.nn.Linear(dim, labels)

    def forward(self, input_ids, attention_mask=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.pooler(torch.tanh(self.layer(self.embed(input_ids))), attention_mask))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny_data(n: int = 16, tokens: int = 6, labels: int = 3, seed: int = 0) -> TokenizedSplit:
    g = torch.Generator().manual_seed(seed)
    return TokenizedSplit(
        {
            "input_ids": torch.randint(0, 50, (n, tokens), generator=g),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long),
            "labels": torch.randint(0, labels, (n,), generator=g),
        }
    )


def lightning_module(model: torch.nn.Module):
    """A LightningModule training ``model`` (MiniLM's interface) with SGD, the finereg loss terms added."""
    import lightning as L

    from finereg.integrations.lightning import FineregModule

    class Classifier(FineregModule, L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.model = net

        def forward(self, **inputs):  # what the frozen copy runs when the LightningModule itself is regularized
            return self.model(**inputs)

        def training_step(self, batch, batch_idx):
            out = self.model(**batch)
            return out.loss + self.finereg_loss(batch, out)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    return Classifier(model)


def pl_trainer(steps: int, callbacks: list, **kw):
    import lightning as L

    cfg = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    cfg.update(kw)
    return L.Trainer(callbacks=callbacks, **cfg)


def pl_run(base: torch.nn.Module, data: TokenizedSplit, terms: list[Term], steps: int, batch: int = 16, **kw):
    """``steps`` optimizer steps of Lightning with a FineregCallback; returns (model, trainer, callback)."""
    from finereg.integrations.lightning import FineregCallback

    model = copy.deepcopy(base)
    callback = FineregCallback(terms, module="model")
    trainer = pl_trainer(steps, [callback], **kw)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, drop_last=True)
    trainer.fit(lightning_module(model), loader)
    return model, trainer, callback
