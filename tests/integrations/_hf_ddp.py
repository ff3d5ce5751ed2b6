"""One FineregTrainer run on MiniLM, as ``python -m tests.integrations._hf_ddp OUT`` (one process) or under
``torchrun --nproc_per_node=N`` (N processes, gloo on CPU): the global batch is 16 either way. Rank 0 writes the
final weights and the log history to OUT."""

import json
import os
import sys

import torch


def main(out: str) -> None:
    torch.set_num_threads(1)
    import finereg
    from finereg.integrations import WrapOptimizer
    from tests.integrations._setup import base_model, hf_run, make_terms, train_data

    world = int(os.environ.get("WORLD_SIZE", "1"))
    terms = [*make_terms(("l2sp", "delta", "bss", "kd")), WrapOptimizer(finereg.SPD, weight_decay=0.5)]
    ddp = {"ddp_backend": "gloo"} if world > 1 else {}
    model, trainer = hf_run(
        base_model(), train_data(32), terms, steps=2, out=out, per_device_train_batch_size=16 // world, **ddp
    )
    if trainer.args.process_index == 0:
        torch.save(model.state_dict(), os.path.join(out, "weights.pt"))
        with open(os.path.join(out, "logs.json"), "w") as f:
            json.dump([h for h in trainer.state.log_history if "loss" in h], f)


if __name__ == "__main__":
    main(sys.argv[1])
