"""The ``finereg`` command: ``fit``, ``bench``, ``demo``, ``methods`` and ``wise-ft``.

finereg demo                                   # L2-SP + DELTA + BSS on the built-in digits task (< 1 min)
finereg fit --method l2sp+bss --sample-rate 15 # the built-in task, any method or combination
finereg fit --data ~/data/cub --arch resnet50 --weights pretrained --method delta --out runs/cub-delta
finereg fit --resume runs/cub-delta            # continue an interrupted run exactly
torchrun --nproc_per_node=2 -m finereg fit ... # DistributedDataParallel
finereg bench                                  # methods x sampling rates x seeds -> table, CSV, plot
finereg methods                                # the methods, their papers and default hyper-parameters
finereg wise-ft runs/cub-delta                 # WiSE-FT sweep of a finished run -> RUN/wise_ft.csv, .json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from .._checks import FineregError
from .config import PROTOCOLS
from .datasets import builtin_name
from .methods import method_names

__all__ = ["main", "build_parser"]

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
_S = argparse.SUPPRESS  # options left out stay unset, so --resume can tell what the user changed


def _fit_options(p: argparse.ArgumentParser, *, for_bench: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default=_S,
        help="smoke: the built-in digits task (data digits, seconds); cifar10: the ImageNet-pretrained "
        "EfficientNet-Lite0 on CIFAR-10 photos with a CIFAR-10-C test set (data cifar10, or cifar10:DIR for your "
        "copy); mnist (alias real): the same network on MNIST digits, the far-domain case (data mnist5k); a user's "
        "ImageFolder: --data PATH "
        f"(default: {'real' if for_bench else 'smoke'})",
    )
    g.add_argument(
        "--data",
        "-d",
        default=_S,
        help="a built-in task (digits, cifar10, cifar10:DIR with torchvision's CIFAR-10 folder, mnist5k) or an "
        "ImageFolder root with train/ and val/ (the test split) and optionally valid/",
    )
    if not for_bench:
        g.add_argument(
            "--sample-rate",
            "-sr",
            type=float,
            default=_S,
            dest="sample_rate",
            help="percent of each class kept for training, stratified (default: 100)",
        )
    g.add_argument("--data-seed", type=int, default=_S, help="seed of the per-class sampling (default: 0)")
    g.add_argument(
        "--image-size",
        type=int,
        default=_S,
        help="input resolution (default: 96 on cifar10, 32 on mnist5k, 224 on ImageFolder data)",
    )
    g.add_argument(
        "--workers",
        "-j",
        type=int,
        default=_S,
        help="data loading processes (default: 0 for an ImageFolder on CPU, else 2)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=_S,
        help="evaluate every N epochs and after the last; 0: after the last only (default: 1; mnist5k: 0)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        "-a",
        default=_S,
        help="builtin, a torchvision or timm architecture (default: builtin on digits, efficientnet_lite0 otherwise)",
    )
    g.add_argument(
        "--weights",
        default=_S,
        help="builtin | pretrained | a torchvision weight name | PATH | none "
        "(default: builtin for the built-in network, pretrained otherwise)",
    )
    g.add_argument(
        "--frozen-prefix",
        default=_S,
        help="blocks.K: freeze the stem and blocks 0..K of a timm EfficientNet and train on their cached outputs; "
        "none: train all (default: blocks.2 on mnist5k, none otherwise)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=_S,
        help="channels-last memory format (default: on for mnist5k, cifar10 and an ImageFolder on CPU, else off)",
    )
    g = p.add_argument_group("method")
    if not for_bench:
        g.add_argument(
            "--method",
            "-m",
            default=_S,
            help=f"{', '.join(method_names())}, or a combination such as l2sp+bss (default: erm)",
        )
    g.add_argument(
        "--set",
        action="append",
        default=_S,
        metavar="METHOD.KEY=VALUE",
        dest="set",
        help="change a hyper-parameter, e.g. --set bss.trade_off=0.001 (repeatable)",
    )
    g = p.add_argument_group("optimization")
    if not for_bench:
        g.add_argument("--seed", type=int, default=_S, help="training seed (default: 0)")
    g.add_argument("--epochs", type=int, default=_S, help="(default: 6 on digits, 4 on mnist5k, 20 on an ImageFolder)")
    g.add_argument(
        "--iters-per-epoch",
        "-i",
        type=int,
        default=_S,
        dest="iters_per_epoch",
        help="steps per epoch (default: 10 on digits, 25 on mnist5k, one pass on an ImageFolder)",
    )
    g.add_argument(
        "--batch-size",
        "-b",
        type=int,
        default=_S,
        help="global batch (default: 32 on digits and mnist5k, 48 on an ImageFolder)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=_S,
        help="learning rate of new heads (default: 0.05 on digits, 0.1 on mnist5k, 0.01 on an ImageFolder)",
    )
    g.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=_S,
        help="backbone learning rate = this x lr (default: 0.1, tllib's --finetune)",
    )
    g.add_argument(
        "--lr-steps", type=int, nargs="+", default=_S, help="epochs at which the lr drops (default: 60%% of the epochs)"
    )
    g.add_argument("--lr-gamma", type=float, default=_S, help="lr factor at each step (default: 0.1)")
    g.add_argument("--momentum", type=float, default=_S, help="SGD momentum, Nesterov (default: 0.9)")
    g.add_argument(
        "--wd",
        "--weight-decay",
        type=float,
        default=_S,
        dest="weight_decay",
        help="SGD weight decay (default: tllib's for the method: 0 with L2-SP/DELTA, else 5e-4)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default=_S, help="auto, cpu, cuda, cuda:1 (default: auto)")
    g.add_argument("--threads", type=int, default=_S, help="CPU threads (default: 1 on digits, torch's otherwise)")
    g.add_argument("--bf16", action="store_true", default=_S, help="bfloat16 autocast")
    g.add_argument("--compile", action="store_true", default=_S, help="torch.compile the training model")
    g.add_argument(
        "--no-deterministic",
        action="store_false",
        default=_S,
        dest="deterministic",
        help="allow non-deterministic kernels",
    )
    g.add_argument(
        "--cache-dir",
        default=_S,
        help="cache for the built-in source model (default: $FINEREG_CACHE or ~/.cache/finereg)",
    )
    g.add_argument("--no-progress", action="store_false", default=_S, dest="progress", help="no progress bars")
    if not for_bench:
        g.add_argument(
            "--no-tensorboard", action="store_false", default=_S, dest="tensorboard", help="no TensorBoard events"
        )


def _listed(typ: type, what: str):
    """An argparse type: a comma-separated list of ``typ`` (the error names the option and the bad value)."""

    def parse(text: str) -> list:
        try:
            return [typ(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finereg",
        description="Regularized fine-tuning: train, benchmark, demo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of every error (also FINEREG_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    fit = sub.add_parser(
        "fit",
        help="fine-tune with a method (or a combination)",
        description="Fine-tune a pretrained network with a transfer-regularization method.",
    )
    _fit_options(fit)
    g = fit.add_argument_group("output")
    g.add_argument("--out", "-o", default=_S, help="run directory (default: runs/fit-<time>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=_S,
        metavar="RUN",
        help="continue the run in RUN (a run directory or checkpoint; default: --out)",
    )
    g.add_argument("--overwrite", action="store_true", default=_S, help="replace a run already in --out")

    bench = sub.add_parser(
        "bench",
        help="methods x sampling rates x seeds -> markdown table, CSV, PNG",
        description="Benchmark methods over sampling rates and seeds (tllib's protocol).",
    )
    bench.add_argument(
        "--methods",
        type=_listed(str, "method names"),
        default=None,
        help="comma-separated methods (combinations with +) or groups: tllib (the default: tllib's methods), "
        "robust (the robust fine-tuning methods), all",
    )
    bench.add_argument(
        "--rates",
        type=_listed(float, "numbers"),
        default=None,
        help="comma-separated sampling rates (default: 15,30,50,100)",
    )
    bench.add_argument(
        "--seeds", type=_listed(int, "integers"), default=None, help="comma-separated seeds (default: 0,1,2)"
    )
    bench.add_argument("--out", "-o", default=None, help="output directory (default: runs/bench-<time>)")
    bench.add_argument(
        "--jobs", type=int, default=None, help="runs in parallel, one thread each (default: one per available CPU core)"
    )
    _fit_options(bench, for_bench=True)

    demo = sub.add_parser("demo", help="a one-minute fine-tuning on the built-in task with L2-SP + DELTA + BSS")
    demo.add_argument("--out", "-o", default=None, help="run directory (default: runs/demo-<time>)")
    demo.add_argument("--method", "-m", default="l2sp+delta+bss", help="(default: l2sp+delta+bss)")
    demo.add_argument("--cache-dir", default=None)
    demo.add_argument("--device", default="auto")

    sub.add_parser("methods", help="list the methods, their papers and default hyper-parameters")

    wise = sub.add_parser(
        "wise-ft",
        help="WiSE-FT on a finished run: interpolate pretrained and fine-tuned weights, choose alpha on validation",
        description="Weight-space ensembles (1-a)*pretrained + a*fine-tuned of a finished run, evaluated on its "
        "valid, test and shift splits; alpha chosen on the validation split. Writes RUN/wise_ft.csv and .json.",
    )
    wise.add_argument("run", metavar="RUN", help="a finished run directory (or a checkpoint in one)")
    wise.add_argument(
        "--alphas",
        type=_listed(float, "numbers in [0, 1]"),
        default=None,
        help="comma-separated alphas (default: 0,0.1,...,1)",
    )
    wise.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (default: auto)")
    wise.add_argument("--batch-size", "-b", type=int, default=None, help="evaluation batch (default: the run's)")
    wise.add_argument(
        "--cache-dir",
        default=None,
        help="cache for the built-in source model (default: $FINEREG_CACHE or ~/.cache/finereg; never the run's)",
    )
    return p


def _fit_config(ns: argparse.Namespace, default_protocol: str | None = None):
    from .loop import FitConfig

    names = {f.name for f in dataclasses.fields(FitConfig)}
    given = {k: v for k, v in vars(ns).items() if k in names}
    if "set" in given:
        given["set"] = list(given["set"])
    protocol = getattr(ns, "protocol", default_protocol)
    if protocol is not None:
        if (
            "data" in given
            and given["data"] != PROTOCOLS[protocol]
            and builtin_name(given["data"]) != PROTOCOLS[protocol]
        ):
            if hasattr(ns, "protocol"):
                raise FineregError(
                    f"--protocol {protocol} trains on {PROTOCOLS[protocol]}; --data {given['data']} says otherwise. "
                    "Give one of them (a user's ImageFolder: --data PATH alone)"
                )
        else:
            given["data"] = PROTOCOLS[protocol]
    return FitConfig(**given)


def _cmd_fit(ns: argparse.Namespace) -> int:
    from .dist import rank
    from .loop import fit

    res = fit(_fit_config(ns))
    if res.interrupted:
        return EXIT_INTERRUPTED
    f = res.final
    if f and rank() == 0:
        print(
            f"done: top-1 {f['test_top1']:.2f}%, mean per-class {f['test_mean_class_acc']:.2f}% "
            f"after {res.epochs_done} epochs; run in {res.run_dir}"
        )
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .loop import FitConfig, fit

    out = ns.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    res = fit(FitConfig(method=ns.method, out=out, cache_dir=ns.cache_dir, device=ns.device, sample_rate=30))
    if res.interrupted:
        return EXIT_INTERRUPTED
    f = res.final
    print(
        f"demo: {ns.method} fine-tuned the built-in pretrained network (digits 0-4 x rotations) on digits 5-9 "
        f"(30% of the training pool): top-1 {f['test_top1']:.2f}%, mean per-class {f['test_mean_class_acc']:.2f}% "
        f"in {time.perf_counter() - t0:.0f}s. Metrics, TensorBoard events and checkpoints: {res.run_dir}"
    )
    return 0


def _cmd_bench(ns: argparse.Namespace) -> int:
    from .bench import BenchConfig, bench

    base = _fit_config(ns, default_protocol="real")
    given = {"methods": ns.methods, "rates": ns.rates, "seeds": ns.seeds, "out": ns.out, "jobs": ns.jobs}
    kw = {k: v for k, v in given.items() if v is not None}
    res = bench(BenchConfig(base=base, **kw))
    return EXIT_INTERRUPTED if res.interrupted else 0


def _cmd_methods(ns: argparse.Namespace) -> int:
    from .methods import method_aliases, method_names, registered

    for name in method_names():
        cls = registered(name)
        hp = ", ".join(f"{k}={v!r}" for k, v in cls.defaults().items()) or "-"
        print(
            f"{name:16s} {cls.title}\n{'':16s} defaults ({cls.defaults_from}): {hp}; weight decay {cls.weight_decay:g}"
            + (f"; head L2 {cls.head_l2:g}" if cls.head_l2 else "")
        )
        for data, hp in cls.data_defaults.items():
            print(f"{'':16s} on {data}: " + ", ".join(f"{k}={v!r}" for k, v in hp.items()))
    print(
        "also accepted: "
        + ", ".join(f"{a} (= {n})" for a, n in method_aliases().items())
        + "; combine methods with +, e.g. l2sp+bss"
    )
    return 0


def _cmd_wise_ft(ns: argparse.Namespace) -> int:
    from .._checks import check_int
    from ..merge import DEFAULT_ALPHAS
    from .wise_ft import CSV_NAME, JSON_NAME, wise_ft_run

    batch = check_int(ns.batch_size, "--batch-size", low=1) if ns.batch_size is not None else None
    alphas = ns.alphas if ns.alphas is not None else DEFAULT_ALPHAS
    res = wise_ft_run(ns.run, alphas, device=ns.device, batch_size=batch, cache_dir=ns.cache_dir)
    chosen = res.chosen
    if chosen is None:
        print(f"wise-ft: no alpha chosen: {res.reason}")
    else:
        shown = " ".join(f"{k}={v:.2f}" for k, v in chosen.items() if k.endswith("top1"))
        print(f"wise-ft: alpha {res.chosen_alpha:g} {res.reason}: {shown}")
    print(f"wise-ft: every alpha in {res.run_dir / CSV_NAME} and {res.run_dir / JSON_NAME}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; an expected error (:class:`~finereg.FineregError`, or the operating system's: a full or
    read-only disk) is one line on stderr and exit code 2; anything else keeps its traceback. ``--debug`` (or
    ``FINEREG_DEBUG=1``) re-raises every error."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return EXIT_ERROR
    debug = ns.debug or os.environ.get("FINEREG_DEBUG", "") not in ("", "0")
    handler = {
        "fit": _cmd_fit,
        "bench": _cmd_bench,
        "demo": _cmd_demo,
        "methods": _cmd_methods,
        "wise-ft": _cmd_wise_ft,
    }[ns.command]
    returned = False
    try:
        code = handler(ns)
        returned = True  # every rank returns from a command (a Ctrl-C stop is agreed by all ranks)
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print("finereg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FineregError, OSError) as e:
        if debug:
            raise
        if isinstance(e, OSError) and not isinstance(e, FineregError) and e.strerror:
            msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        else:
            msg = str(e)
        print(f"finereg {ns.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        from .dist import shutdown

        shutdown(clean=returned)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
