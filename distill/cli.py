"""`distill train | fit-weights | eval | interpolate-weights | cache | export | plan | sweep`: a thin layer over the library.

Runs as `distill ...` on one process, or under the DeepSpeed launcher as
`deepspeed --num_gpus N --module distill.cli train ...` (the launcher adds `--local_rank=N`, accepted and
ignored here: the rank comes from the environment).

Each command is one row of `COMMANDS`: its help, its arguments and the function that runs it. A
command's heavy libraries (torch, transformers, DeepSpeed) are imported when it runs, so `--help`
answers at once. Errors a user can fix are the kinds in `distill.errors`: one line, their exit code.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.max_steps=10")


# ------------------------------------------------------------------------------------ commands
def _plan_arguments(parser):
    _config_arguments(parser)
    parser.add_argument("--ranks", type=int, default=1, help="ranks the run will have (default 1)")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="memory of one rank's device, e.g. 80GB (default: this machine's GPU, or its RAM / ranks)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="the kind of device the run will have (default: this machine's)")


def _plan(args) -> None:
    from distill.api import load_config, plan

    result = plan(load_config(args.config, args.overrides), args.ranks, args.device_memory, args.device)
    print(result["table"])
    if not result["fits"]:
        raise SystemExit(1)


def _sweep_arguments(parser):
    parser.add_argument("config", help="YAML file whose `sweep:` section says what to search")
    parser.add_argument("out", help="a new folder: a run directory per trial, trials.jsonl, sweep.png, best.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every trial")
    parser.add_argument("--trials", type=int, default=None, help="trials besides the hard-label twin "
                        "(default: sweep.trials)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per trial, scored by their mean "
                        "(default: sweep.seeds)")


def _sweep(args) -> None:
    from distill.api import sweep

    result = sweep(args.config, args.out, args.overrides, trials=args.trials, seeds=args.seeds)
    print(result["table"])
    print(f"written: {args.out}/trials.jsonl, sweep.png, sweep_table.txt, best.yaml "
          f"(use: distill train {args.out}/best.yaml)")


def _train_arguments(parser):
    _config_arguments(parser)
    parser.add_argument("--weights", action="append", default=[], metavar="FRAGMENT",
                        help="YAML fragment merged after CONFIG, e.g. the weights.yaml of `distill fit-weights`")


def _train(args) -> None:
    from distill.api import load_config, train

    train(load_config(args.config, args.overrides, fragments=args.weights))


def _fit_arguments(parser):
    _config_arguments(parser)
    parser.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR-fit)")
    parser.add_argument("--temperatures", action="store_true", help="also fit per-teacher temperatures")
    parser.add_argument("--method", choices=["linear", "geometric"], default=None,
                        help="which fitted mix goes into weights.yaml (default: the config's, else linear)")


def _fit_weights(args) -> None:
    from distill.api import fit_weights, load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(f"{cfg.output_dir}-fit")
    result = fit_weights(cfg, out, fit_temperatures=args.temperatures, method=args.method)
    print(result["table"])
    print(f"written: {out}/fit_weights.json, fit_weights.png, weights.yaml "
          f"(use: distill train {args.config} --weights {out}/weights.yaml)")


def _eval_arguments(parser):
    parser.add_argument("model", help="a run directory or an exported model folder")
    _config_arguments(parser)


def _eval(args) -> None:
    from distill.api import evaluate, load_config

    task, report = evaluate(load_config(args.config, args.overrides), Path(args.model))
    print(task.format_table(report))


def _interpolate_arguments(parser):
    parser.add_argument("first", metavar="A")
    parser.add_argument("second", metavar="B")
    parser.add_argument("out_dir", metavar="OUT")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--alpha-sweep", default=None, metavar="A1,A2,...",
                        help="score these alphas on --config's validation split and keep the best")
    parser.add_argument("--config", default=None, help="config whose data section gives the validation split")
    parser.add_argument("--overwrite", action="store_true")


def _interpolate_weights(args) -> None:
    from distill.errors import ConfigError
    from distill.exporting import wise_ft

    first, second, out = Path(args.first), Path(args.second), Path(args.out_dir)
    for folder in (first, second):
        if folder.is_dir() and (folder / "student" / "config.json").is_file():
            raise ConfigError(f"{folder} is a run directory: pass its exported {folder / 'student'}")
    if (args.alpha is None) == (args.alpha_sweep is None):
        raise ConfigError("interpolate-weights: give exactly one of --alpha or --alpha-sweep")
    if args.alpha is not None:
        wise_ft.write_interpolated(first, second, out, args.alpha, args.overwrite)
        print(f"wrote {args.alpha} * {first} + {1 - args.alpha} * {second} to {out}")
        return
    if args.config is None:
        raise ConfigError("interpolate-weights --alpha-sweep needs --config (its validation split)")
    try:
        alphas = [float(a) for a in args.alpha_sweep.split(",")]
    except ValueError as error:
        raise ConfigError(f"--alpha-sweep takes comma-separated numbers, got {args.alpha_sweep!r}") from error
    from distill.api import load_config

    result = wise_ft.sweep(load_config(args.config), first, second, alphas, out, args.overwrite)
    print(wise_ft.format_sweep(result["rows"], result["best"]["alpha"]))
    print(f"best alpha {result['best']['alpha']} written to {out} (alpha_sweep.json, alpha_sweep.png)")


def _cache_arguments(parser):
    _config_arguments(parser)
    parser.add_argument("--out", required=True, help="the cache folder (then train with teachers.cache=FOLDER)")
    parser.add_argument("--top-k", type=int, default=None, help="causal LM, --store topk: log-probabilities kept per "
                                                                  "token and teacher (default 64)")
    parser.add_argument("--store", default="topk", choices=["topk", "sampled", "hidden"],
                        help="causal LM: topk (sparse, biased), sampled (sparse, unbiased draws) or hidden (last "
                             "hidden states + output layers: exact)")
    parser.add_argument("--samples", type=int, default=None, help="causal LM, --store sampled: draws per token and "
                                                                  "teacher (default 16)")
    parser.add_argument("--hidden-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="causal LM, --store hidden: the stored states' dtype (default bfloat16, half "
                             "fp32's bytes, whatever the teachers compute in)")
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help="rows (blocks or examples) per shard file: the unit a resumed or multi-rank cache "
                             "writes (default 512 blocks, 4096 examples)")


def _cache(args) -> None:
    from distill.api import cache, load_config

    meta = cache(load_config(args.config, args.overrides), Path(args.out), top_k=args.top_k, store=args.store,
                 hidden_dtype=args.hidden_dtype, samples=args.samples, rows_per_shard=args.rows_per_shard)
    stored = (f"top-{meta['top_k']}" if "top_k" in meta else f"{meta['samples']} draws" if "samples" in meta else
              f"{meta['hidden_dtype']} hidden states" if "hidden_dtype" in meta else "the logits")
    rows = "blocks" if "store" in meta else "rows"  # a causal-LM store counts blocks, classification examples
    unit = f"{rows} in {meta['shards']} shard(s)" if "shards" in meta else rows
    what = f"{stored} of {len(meta['teachers'])} teacher(s) over {meta['rows']} {unit}"
    print(f"cached {what}: {args.out} (train with teachers.cache={args.out})")


def _export_arguments(parser):
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 linear layers (torchao); validation accuracy before/after goes in the model card")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx, checked against PyTorch with onnxruntime on validation")


def _export(args) -> None:
    from distill.api import export

    out = export(Path(args.run_dir), Path(args.out_dir), dtype=args.dtype, overwrite=args.overwrite,
                 quantize=args.quantize, onnx=args.onnx)
    if args.onnx:
        parity = json.loads((out / "onnx_parity.json").read_text())
        print(f"onnx: {parity['file']}, largest logit difference to PyTorch {parity['max_abs_logit_difference']:.2e} "
              f"over {parity['rows']} validation rows")
    if args.quantize:
        figures = json.loads((out / "compression.json").read_text())
        before, after = figures["validation_before"], figures["validation_after"]
        changes = ", ".join(f"{name} {before[name]:.4f} -> {after[name]:.4f}" for name in before
                            if name not in ("seconds", "nll"))
        print(f"{args.quantize}: weights {figures['bytes_before']:,} -> {figures['bytes_after']:,} bytes, "
              f"validation {changes}")
    print(f"exported to {out}")


@dataclass(frozen=True)
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS: Dict[str, Command] = {
    "train": Command("distil (or fine-tune with loss.kd_alpha=0) from a YAML config", _train_arguments, _train),
    "fit-weights": Command("fit teacher mixture weights (and temperatures) on validation", _fit_arguments,
                           _fit_weights),
    "eval": Command("evaluate an exported student (or a run's) with the config's teachers", _eval_arguments, _eval),
    "interpolate-weights": Command("write alpha * A + (1 - alpha) * B (WiSE-FT, model soups)",
                                   _interpolate_arguments, _interpolate_weights),
    "cache": Command("run the teachers once: every logit per example (classification), or the top-k log-probs "
                     "per token (causal LM)", _cache_arguments, _cache),
    "export": Command("consolidate a run's checkpoint into a save_pretrained folder", _export_arguments, _export),
    "plan": Command("the memory of a run per rank, from the models' configs, before any weight loads",
                    _plan_arguments, _plan),
    "sweep": Command("search kd_alpha, temperature, learning rate... on validation with Optuna (the hard-label "
                     "twin first)", _sweep_arguments, _sweep),
}


# ------------------------------------------------------------------------------------ parsing
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own notices and progress bars (silenced by default)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(commands.add_parser(name, help=command.help))
    return parser


def _strip_launcher_args(argv: List[str]) -> List[str]:
    return [arg for arg in argv if not arg.startswith(("--local_rank=", "--local-rank="))]


def parse(words: List[str]) -> argparse.Namespace:
    """The command line as a namespace. Overrides may come before or after options (argparse stops a
    '*' positional at the first option), so leftover key=value words are overrides too."""
    parser = _parser()
    args, leftover = parser.parse_known_args(_strip_launcher_args(words))
    unknown = [word for word in leftover if word.startswith("-") or "=" not in word]
    if unknown or (leftover and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or leftover)}")
    if leftover:
        args.overrides = list(args.overrides) + leftover
    return args


def main(argv: Optional[List[str]] = None) -> int:
    from distill.util.quiet import quiet_start, verbose_requested

    words = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose_requested(words)
    args = parse([word for word in words if word != "--verbose"])  # --verbose is accepted anywhere
    if not verbose:
        quiet_start()  # before the command imports its libraries (--help has exited above)
    from distill.errors import DistillError

    try:
        COMMANDS[args.command].run(args)
    except DistillError as error:
        print(f"distill: {error.label}: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
