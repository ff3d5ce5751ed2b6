"""A Hugging Face Trainer step on the real MiniLM, with and without finereg's L2-SP, side by side in one run.

The model is the pretrained all-MiniLM-L6-v2 with a new head (22.7 M parameters, float32), the data the docstring
task (batches of 16 sentences, 32 tokens), the optimizer the Trainer's default AdamW. Variants, each its own
Trainer, timed per optimizer step (a callback's ``on_step_begin`` → ``on_step_end``: data, forward, backward,
optimizer) in interleaved rounds:

  trainer           -- ``transformers.Trainer``, no regularizer: the reference;
  wrapper by hand   -- ``transformers.Trainer(optimizers=(DecoupledL2SP(AdamW(...)), None))``: finereg's decoupled
                       L2-SP without the integration, the regularizer's own cost;
  finereg decoupled -- ``FineregTrainer(regularizers=[L2SPTerm(mode="decoupled")])``: the same wrapper installed by
                       the integration (the target: ≤ 1.05 × trainer);
  finereg loss term -- ``FineregTrainer(regularizers=[L2SPTerm(mode="loss")])``: L2-SP as a loss term (its value and
                       gradient through autograd every step).

The floor of the decoupled form is one ``_foreach_lerp_`` pass over θ and θ0 (read both, write θ), timed alone
and printed as the expected ratio 1 + lerp / step. Checks first that the integration and the wrapper by hand give
the same weights after the same steps (exits non-zero if not). The variants take turns, ``--steps`` steps each
(the first not timed), for ``--rounds`` rounds. A step is timed in CPU time of the training thread
(``time.thread_time``; with one torch thread and no loader workers all of a step's work runs on it), so the
load of a shared machine, which delays the thread but does not add to its work, does not enter; a variant's
time is its fastest timed step. The median wall-clock step is printed beside it.

    python benchmarks/bench_hf_trainer.py [--threads 1] [--steps 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per variant and round (first one not timed)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from finereg.integrations import L2SPTerm
    from finereg.integrations.minilm import SentenceClassifier, load_tokenizer
    from finereg.integrations.text_task import stdlib_docstrings, tokenize
    from finereg.integrations.transformers import FineregTrainer
    from finereg.optim import DecoupledL2SP

    task = stdlib_docstrings()
    data = tokenize(task.train, load_tokenizer(), max_length=32)
    torch.manual_seed(0)
    base = SentenceClassifier.from_minilm(task.num_labels, dropout=0.0)
    out = tempfile.mkdtemp(prefix="bench_hf_")

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times: list[tuple[float, float]] = []

        def on_step_begin(self, *a, **k):
            self.t0 = (time.thread_time(), time.perf_counter())

        def on_step_end(self, *a, **k):
            self.times.append((time.thread_time() - self.t0[0], time.perf_counter() - self.t0[1]))

    def training_args(steps: int) -> transformers.TrainingArguments:
        return transformers.TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            train_sampling_strategy="sequential",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_drop_last=True,
        )

    def make(kind: str):
        model = copy.deepcopy(base)
        args = training_args(args_steps)
        if kind == "trainer":
            return transformers.Trainer(model=model, args=args, train_dataset=data), model
        if kind == "wrapper by hand":
            inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
            opt = DecoupledL2SP(inner, alpha=a, beta=a, exclude=(), new_params=[model.head.weight, model.head.bias])
            return transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)), model
        mode = "decoupled" if kind == "finereg decoupled" else "loss"
        term = L2SPTerm(a, a, mode=mode, new_params="head.*")
        return FineregTrainer(model=model, args=args, train_dataset=data, regularizers=[term]), model

    a, args_steps = args.alpha, args.steps
    kinds = ["trainer", "wrapper by hand", "finereg decoupled", "finereg loss term"]
    made = {k: make(k) for k in kinds}
    timers = {k: StepTimer() for k in kinds}
    for k, (trainer, _) in made.items():
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.add_callback(timers[k])

    print(
        f"MiniLM + head, {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters, batch 16 x 32 tokens, "
        f"AdamW; torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)"
    )
    steps: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds:
            timers[k].times.clear()
            made[k][0].train()
            steps[k] += timers[k].times[1:]
        if r == 0:
            ref, mine = made["wrapper by hand"][1].state_dict(), made["finereg decoupled"][1].state_dict()
            worst = max(float((ref[n] - mine[n]).abs().max()) for n in ref)
            print(f"integration vs the wrapper by hand after {args.steps} steps: max |Δw| = {worst:.2e}")
            if worst > 1e-5:
                print("FAILED: the integration does not give the wrapper's weights")
                return 1

    params = [p for p in made["finereg decoupled"][1].parameters()]
    anchors = [p.detach().clone() for p in params]
    lerp = []
    with torch.no_grad():
        for _ in range(20):
            t0 = time.thread_time()
            torch._foreach_lerp_(params, anchors, 1e-8)
            lerp.append(time.thread_time() - t0)
    floor = min(lerp)

    cpu = {k: min(t for t, _ in v) for k, v in steps.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in steps.items()}
    ref = cpu["trainer"]
    print(f"{'variant':20s} {'CPU (ms)':>10s} {'/ trainer':>10s} {'wall (ms)':>10s} {'/ trainer':>10s}")
    for k in kinds:
        print(
            f"{k:20s} {1e3 * cpu[k]:10.1f} {cpu[k] / ref:10.3f} {1e3 * wall[k]:10.1f} {wall[k] / wall['trainer']:10.3f}"
        )
    print(
        f"floor of the decoupled decay: one _foreach_lerp_ over θ, θ0 = {1e3 * floor:.1f} ms -> {1 + floor / ref:.3f}"
    )
    ratio = cpu["finereg decoupled"] / ref
    print(f"FineregTrainer + decoupled L2-SP / Trainer: {ratio:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
