"""Fine-tune the real pretrained all-MiniLM-L6-v2 with PyTorch Lightning and finereg's DELTA on hidden states,
plus L2-SP and BSS, offline.

The task: Python standard library docstrings labelled by the module they document (see
finereg.integrations.text_task). finereg adds, through a FineregCallback and the FineregModule mixin:

* DELTA's behavioral penalty on the hidden states of two transformer layers: trade_off · Σ ½‖h_t − h_s‖², h_s the
  frozen pretrained MiniLM's hidden states on the same batch (the callback keeps the frozen copy and its hooks);
* L2-SP as a loss term (α/2‖w − w0‖² on the pretrained weights, β/2‖w‖² on the new head);
* BSS on the pooled sentence embedding.

training_step adds ``self.finereg_loss(batch, out)`` to the task loss; each term is logged with ``self.log``; the
callback's state (anchors, the frozen copy) rides in Lightning's checkpoints.

Run:  python examples/lightning_delta.py [--epochs 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS = ["encoder.encoder.layer.2", "encoder.encoder.layer.5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--delta", type=float, default=1e-4, help="DELTA trade-off (the penalty sums over tokens)")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning as L

    from finereg.integrations import BSSTerm, DeltaTerm, L2SPTerm
    from finereg.integrations.lightning import FineregCallback, FineregModule
    from finereg.integrations.minilm import SentenceClassifier, load_tokenizer
    from finereg.integrations.text_task import accuracy, stdlib_docstrings, tokenize

    class Classifier(FineregModule, L.LightningModule):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            out = self.model(**batch)
            self.log("task_loss", out.loss, on_step=False, on_epoch=True, batch_size=len(batch["labels"]))
            return out.loss + self.finereg_loss(batch, out)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=0.0)

    task = stdlib_docstrings()
    tok = load_tokenizer()
    train, val, test = (tokenize(task.split(s), tok, args.max_length) for s in ("train", "val", "test"))
    print(f"task: {task.num_labels} modules {', '.join(task.labels)}; {len(train)}/{len(val)}/{len(test)} sentences")
    L.seed_everything(args.seed, verbose=False)
    model = SentenceClassifier.from_minilm(task.num_labels)
    print(f"before fine-tuning: val {accuracy(model, val):.1f}%  (a random head)")

    terms = [DeltaTerm(LAYERS, args.delta), L2SPTerm(0.01, new_params="head.*"), BSSTerm("pooler", 1e-3)]
    callback = FineregCallback(terms, module="model")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)
    trainer.fit(Classifier(model), loader)

    m = {k: float(v) for k, v in trainer.logged_metrics.items()}
    print(
        f"last epoch means: task {m['task_loss']:.4f}, delta {m['finereg/delta_epoch']:.4f}, "
        f"l2sp {m['finereg/l2sp_epoch']:.2e}, bss {m['finereg/bss_epoch']:.2e}"
    )
    source = callback.reg.source
    frozen = not any(p.requires_grad for p in source.parameters())
    print(f"DELTA compares {', '.join(LAYERS)} with a frozen copy: frozen {frozen}, separate {source is not model}")
    val_acc, test_acc = accuracy(model, val), accuracy(model, test)
    print(f"trained {trainer.global_step} steps; after fine-tuning: val {val_acc:.1f}%, test {test_acc:.1f}%")


if __name__ == "__main__":
    main()
