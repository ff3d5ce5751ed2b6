"""Fine-tune the real pretrained all-MiniLM-L6-v2 with Hugging Face's Trainer and finereg's L2-SP + BSS, offline.

The task: Python standard library docstrings labelled by the module they document (6 classes, 144 training
sentences, built from this Python's own docstrings; see finereg.integrations.text_task). The model: MiniLM's mean
pooled sentence embedding and a new linear head. finereg adds, through FineregTrainer:

* L2-SP in its decoupled form (finereg.DecoupledL2SP inside the Trainer's AdamW step: θ ← θ − η·α·(θ − θ0) for the
  pretrained weights, θ ← θ − η·β·θ for the new head), its state (θ0) in the Trainer's optimizer.pt;
* BSS on the pooled embedding (the k = 1 smallest squared singular value of the batch's embeddings).

The terms are logged beside the Trainer's loss (log_history, TensorBoard, CSV ...).

Run:  python examples/hf_trainer_l2sp.py [--epochs 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--alpha", type=float, default=1.0, help="decoupled L2-SP: pull per unit of learning rate")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from finereg.integrations import BSSTerm, L2SPTerm
    from finereg.integrations.minilm import SentenceClassifier, load_tokenizer
    from finereg.integrations.text_task import accuracy, stdlib_docstrings, tokenize
    from finereg.integrations.transformers import FineregTrainer

    task = stdlib_docstrings()
    tok = load_tokenizer()
    train, val, test = (tokenize(task.split(s), tok, args.max_length) for s in ("train", "val", "test"))
    print(f"task: {task.num_labels} modules {', '.join(task.labels)}; {len(train)}/{len(val)}/{len(test)} sentences")
    torch.manual_seed(args.seed)
    model = SentenceClassifier.from_minilm(task.num_labels)
    print(f"before fine-tuning: val {accuracy(model, val):.1f}%  (a random head)")

    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            dataloader_drop_last=True,  # BSS needs more samples than k in every batch
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
        )
        terms = [L2SPTerm(args.alpha, 0.01, mode="decoupled", new_params="head.*"), BSSTerm("pooler", 1e-3)]
        trainer = FineregTrainer(model=model, args=training, train_dataset=train, regularizers=terms)
        trainer.remove_callback(transformers.PrinterCallback)  # the summary below replaces its per-step dicts
        trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs[:: max(len(logs) // 6, 1)]:
        print(
            f"  step {h['step']:3d}  loss {h['loss']:.4f} = task {h['task_loss']:.4f} + bss {h['bss']:.2e}"
            f"   (decoupled l2sp penalty {h['l2sp']:.3e})"
        )
    consistent = all(abs(h["loss"] - h["task_loss"] - h["bss"]) <= 1e-5 * max(1.0, abs(h["loss"])) for h in logs)
    print(f"trained {trainer.state.global_step} steps; loss = task_loss + bss at every step: {consistent}")
    wrapper = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    print(f"optimizer: {type(wrapper).__name__}({type(wrapper.optimizer).__name__})")
    print(f"after fine-tuning: val {accuracy(model, val):.1f}%, test {accuracy(model, test):.1f}%")


if __name__ == "__main__":
    main()
