"""`distill train | eval | export | cache`: a thin layer over the library.

Runs as `distill ...` on one process, or under the DeepSpeed launcher as
`deepspeed --num_gpus N --module distill.cli train ...` (the launcher adds `--local_rank=N`, accepted and
ignored here: the rank comes from the environment).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own notices and progress bars (silenced by default)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="distil (or fine-tune with loss.kd_alpha=0) from a YAML config")
    train.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.max_steps=10")
    train.add_argument("--weights", action="append", default=[], metavar="FRAGMENT",
                       help="YAML fragment merged after CONFIG, e.g. the weights.yaml of `distill fit-weights`")

    fit = commands.add_parser("fit-weights", help="fit teacher mixture weights (and temperatures) on validation")
    fit.add_argument("config")
    fit.add_argument("overrides", nargs="*")
    fit.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR-fit)")
    fit.add_argument("--temperatures", action="store_true", help="also fit per-teacher temperatures")
    fit.add_argument("--method", choices=["linear", "geometric"], default=None,
                     help="which fitted mix goes into weights.yaml (default: the config's, else linear)")

    evaluate = commands.add_parser("eval", help="evaluate an exported student (or a run's) with the config's teachers")
    evaluate.add_argument("model", help="a run directory or an exported model folder")
    evaluate.add_argument("config")
    evaluate.add_argument("overrides", nargs="*")

    mix = commands.add_parser("interpolate-weights", help="write alpha * A + (1 - alpha) * B (WiSE-FT, model soups)")
    mix.add_argument("first", metavar="A")
    mix.add_argument("second", metavar="B")
    mix.add_argument("out_dir", metavar="OUT")
    mix.add_argument("--alpha", type=float, default=None)
    mix.add_argument("--alpha-sweep", default=None, metavar="A1,A2,...",
                     help="score these alphas on --config's validation split and keep the best")
    mix.add_argument("--config", default=None, help="config whose data section gives the validation split")
    mix.add_argument("--overwrite", action="store_true")

    cache = commands.add_parser("cache", help="run the teachers once: every logit per example (classification), or "
                                              "the top-k log-probs per token (causal LM)")
    cache.add_argument("config")
    cache.add_argument("overrides", nargs="*")
    cache.add_argument("--out", required=True, help="the cache folder (then train with teachers.cache=FOLDER)")
    cache.add_argument("--top-k", type=int, default=None, help="causal LM, --store topk: log-probabilities kept per "
                                                                 "token and teacher (default 64)")
    cache.add_argument("--store", default="topk", choices=["topk", "sampled", "hidden"],
                       help="causal LM: topk (sparse, biased), sampled (sparse, unbiased draws) or hidden (last hidden "
                            "states + output layers: exact)")
    cache.add_argument("--samples", type=int, default=None, help="causal LM, --store sampled: draws per token and "
                                                                 "teacher (default 16)")
    cache.add_argument("--hidden-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="causal LM, --store hidden: the stored states' dtype (default: the teachers')")
    cache.add_argument("--rows-per-shard", type=int, default=None,
                       help="rows (blocks or examples) per shard file: the unit a resumed or multi-rank cache writes "
                            "(default 512 blocks, 4096 examples)")

    export = commands.add_parser("export", help="consolidate a run's checkpoint into a save_pretrained folder")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    export.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 linear layers (torchao); validation accuracy before/after goes in the model card")
    export.add_argument("--onnx", action="store_true",
                        help="also write model.onnx, checked against PyTorch with onnxruntime on validation")
    return parser


def _strip_launcher_args(argv: List[str]) -> List[str]:
    return [arg for arg in argv if not arg.startswith(("--local_rank=", "--local-rank="))]


def evaluate_saved_model(cfg, model_path: Path):
    """`distill eval`: one process, no DeepSpeed. Scores a saved student (an exported folder, or a
    run directory's `student/`) next to the config's teachers and their interpolated target, with
    the config's task; returns (task, report)."""
    from distill.distributed import init_distributed
    from distill.hardware import local_device, teacher_dtype
    from distill.modeling import count_parameters, load_tokenizer
    from distill.tasks import build_task

    task = build_task(cfg)
    if (model_path / "student" / "config.json").is_file():
        model_path = model_path / "student"
    key = f"model {model_path}"
    splits = task.read_splits()
    plans = task.plan_teachers(load_tokenizer(str(model_path.resolve()), key, cfg.trust_remote_code))
    student = task.load_saved_student(model_path.resolve(), key)
    task.encode(splits.train, "train")
    validation = task.encode(splits.validation, "validation")
    init_distributed()
    device = local_device()
    ensemble = source = None
    if plans:
        ensemble, source = task.load_teachers(plans, device, teacher_dtype(cfg.teachers.dtype, device))
    metrics, _ = task.evaluate(student.to(device).eval(), ensemble, source, device)
    teacher_params = ensemble.parameter_counts if ensemble is not None else []
    return task, task.report(plans, teacher_params, count_parameters(student), metrics, {"steps": 0, "seconds": 0.0},
                             splits.train, validation)


def main(argv: Optional[List[str]] = None) -> int:
    from distill.quiet import quiet_start, verbose_requested

    words = list(sys.argv[1:] if argv is None else argv)
    if not verbose_requested(words):
        quiet_start()
    words = [word for word in words if word != "--verbose"]  # accepted anywhere on the line
    parser = _parser()
    # Overrides may come before or after options (argparse stops a '*' positional at the first
    # option), so leftover key=value words are overrides too; anything else is an error.
    args, leftover = parser.parse_known_args(_strip_launcher_args(words))
    unknown = [word for word in leftover if word.startswith("-") or "=" not in word]
    if unknown or (leftover and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or leftover)}")
    if leftover:
        args.overrides = list(args.overrides) + leftover
    from distill.config import ConfigError
    from distill.tasks import build_task, load_task_config

    try:
        if args.command == "train":
            from distill.trainer import train

            train(load_task_config(args.config, args.overrides, fragments=args.weights))
        elif args.command == "fit-weights":
            from distill.fit_weights import run_fit_weights

            cfg = load_task_config(args.config, args.overrides)
            out = Path(args.out) if args.out else Path(f"{cfg.output_dir}-fit")
            result = run_fit_weights(cfg, out, fit_temperatures=args.temperatures, method=args.method)
            print(result["table"])
            print(f"written: {out}/fit_weights.json, fit_weights.png, weights.yaml "
                  f"(use: distill train {args.config} --weights {out}/weights.yaml)")
        elif args.command == "eval":
            task, report = evaluate_saved_model(load_task_config(args.config, args.overrides), Path(args.model))
            print(task.format_table(report))
        elif args.command == "interpolate-weights":
            from distill import weight_interpolation

            first, second, out = Path(args.first), Path(args.second), Path(args.out_dir)
            for folder in (first, second):
                if folder.is_dir() and (folder / "student" / "config.json").is_file():
                    raise ConfigError(f"{folder} is a run directory: pass its exported {folder / 'student'}")
            if (args.alpha is None) == (args.alpha_sweep is None):
                raise ConfigError("interpolate-weights: give exactly one of --alpha or --alpha-sweep")
            if args.alpha is not None:
                weight_interpolation.write_interpolated(first, second, out, args.alpha, args.overwrite)
                print(f"wrote {args.alpha} * {first} + {1 - args.alpha} * {second} to {out}")
            else:
                if args.config is None:
                    raise ConfigError("interpolate-weights --alpha-sweep needs --config (its validation split)")
                try:
                    alphas = [float(a) for a in args.alpha_sweep.split(",")]
                except ValueError as error:
                    raise ConfigError(f"--alpha-sweep takes comma-separated numbers, got {args.alpha_sweep!r}") from error
                result = weight_interpolation.sweep(load_task_config(args.config), first, second, alphas, out,
                                                    args.overwrite)
                print(weight_interpolation.format_sweep(result["rows"], result["best"]["alpha"]))
                print(f"best alpha {result['best']['alpha']} written to {out} (alpha_sweep.json, alpha_sweep.png)")
        elif args.command == "cache":
            import os

            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under the deepspeed launcher: each rank its shards
                from distill.distributed import init_distributed

                init_distributed()
            meta = build_task(load_task_config(args.config, args.overrides)).write_cache(
                Path(args.out), args.top_k, args.store, args.hidden_dtype, args.samples, args.rows_per_shard)
            stored = (f"top-{meta['top_k']}" if "top_k" in meta else f"{meta['samples']} draws" if "samples" in meta else
                      f"{meta['hidden_dtype']} hidden states" if "hidden_dtype" in meta else "the logits")
            unit = f"blocks in {meta['shards']} shard(s)" if "shards" in meta else "rows"
            what = f"{stored} of {len(meta['teachers'])} teacher(s) over {meta['rows']} {unit}"
            print(f"cached {what}: {args.out} (train with teachers.cache={args.out})")
        elif args.command == "export":
            from distill.export import export_run

            out = export_run(Path(args.run_dir), Path(args.out_dir), dtype=args.dtype, overwrite=args.overwrite,
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
    except ConfigError as error:
        print(f"distill: config error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from distill.checkpointing import CheckpointWriteError
        from distill.export import ExportError
        from distill.signals import NonFiniteLogitsError
        from distill.trainer import DivergedError

        if isinstance(error, ExportError):
            print(f"distill: export error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, NonFiniteLogitsError):
            print(f"distill: stopped: {error}", file=sys.stderr)
            return 3
        if isinstance(error, CheckpointWriteError):
            print(f"distill: checkpoint failed: {error}", file=sys.stderr)
            return 4
        if isinstance(error, DivergedError):
            print(f"distill: stopped, diverged: {error}", file=sys.stderr)
            return 5
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
