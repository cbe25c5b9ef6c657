"""Weight-space interpolation of two checkpoints of one architecture: a * A + (1 - a) * B.

WiSE-FT style (a distilled student and its initialisation) or a two-model soup (students distilled
with different teacher weights). `--alpha-sweep` scores a grid of alphas on the validation split
and keeps the best, as the seed material asks for its lambda: chosen on validation.

Works on the checkpoint files (all `*.safetensors` of a folder), so it is indifferent to the
task family; the output folder is A's folder (config, tokenizer) with interpolated weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from distill.errors import ConfigError


def read_weights(folder: Path) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no .safetensors weights")
    weights: Dict[str, Tensor] = {}
    for path in files:
        weights.update(load_file(str(path)))
    return weights


def check_compatible(first: Path, second: Path) -> None:
    """Same architecture, label set and tokenizer, or a ConfigError saying what differs."""
    for folder in (first, second):
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"{folder} holds no config.json: pass a saved model folder (e.g. a run's student/)")
    configs = [json.loads((Path(folder) / "config.json").read_text()) for folder in (first, second)]
    for key in ("model_type", "architectures", "id2label"):
        if configs[0].get(key) != configs[1].get(key):
            raise ConfigError(f"{first} and {second} differ in {key}: {configs[0].get(key)} vs {configs[1].get(key)}")
    from transformers import AutoTokenizer

    vocabularies = [AutoTokenizer.from_pretrained(folder).get_vocab() for folder in (first, second)]
    if vocabularies[0] != vocabularies[1]:
        raise ConfigError(f"{first} and {second} use different tokenizers "
                          f"({len(vocabularies[0])} vs {len(vocabularies[1])} tokens)")


def interpolate_weights(first: Dict[str, Tensor], second: Dict[str, Tensor], alpha: float) -> Dict[str, Tensor]:
    """alpha * first + (1 - alpha) * second for every floating tensor (computed in float64, stored
    in the original dtype); alpha 1 gives `first` and alpha 0 `second` exactly. Other tensors
    (integer buffers) must be equal and are copied."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if first.keys() != second.keys():
        missing = sorted(set(first) ^ set(second))[:5]
        raise ConfigError(f"the checkpoints hold different tensors (e.g. {missing}): not the same architecture")
    mixed = {}
    for name, tensor_a in first.items():
        tensor_b = second[name]
        if tensor_a.shape != tensor_b.shape:
            raise ConfigError(f"tensor {name} has shape {tuple(tensor_a.shape)} in one checkpoint and "
                              f"{tuple(tensor_b.shape)} in the other")
        if not torch.is_floating_point(tensor_a):
            if not torch.equal(tensor_a, tensor_b):
                raise ConfigError(f"non-float tensor {name} differs between the checkpoints")
            mixed[name] = tensor_a.clone()
        elif alpha == 1.0:
            mixed[name] = tensor_a.clone()
        elif alpha == 0.0:
            mixed[name] = tensor_b.to(tensor_a.dtype).clone()
        else:
            value = alpha * tensor_a.double() + (1.0 - alpha) * tensor_b.double()
            mixed[name] = value.to(tensor_a.dtype)
    return mixed


def check_output_folder(first: Path, second: Path, out_dir: Path, overwrite: bool) -> None:
    """Before anything is read or written: never into an input, --overwrite only over distill's own."""
    from distill.util.outputs import check_output

    check_output(out_dir, [first, second], overwrite, "interpolate-weights")


def write_interpolated(first: Path, second: Path, out_dir: Path, alpha: float, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from distill.util.outputs import written_folder

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in [0, 1], got {alpha}")
    check_output_folder(first, second, out_dir, overwrite)
    check_compatible(first, second)
    mixed = interpolate_weights(read_weights(first), read_weights(second), alpha)
    with written_folder(Path(out_dir)) as folder:
        for path in Path(first).iterdir():
            if (path.is_file() and path.suffix != ".safetensors" and not path.name.endswith(".index.json")
                    and path.name not in ("README.md", "compression.json", "onnx_parity.json", "model.onnx")
                    and not path.name.startswith(".")):
                shutil.copy2(path, folder / path.name)
        save_file({k: v.contiguous() for k, v in mixed.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        (folder / "README.md").write_text(
            f"---\nlibrary_name: transformers\ntags:\n- distill\n- weight-interpolation\n---\n\n"
            f"# Weight-space interpolation\n\n`{alpha} * {first} + {1 - alpha} * {second}` (by `distill interpolate-weights`).\n")
    return Path(out_dir)


def sweep(cfg, first: Path, second: Path, alphas: Sequence[float], out_dir: Path, overwrite: bool = False) -> Dict:
    """Score each alpha on cfg's validation split; write the best (highest accuracy, then lowest
    NLL, then the first) to out_dir with the table (`alpha_sweep.json`) and a PNG curve."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.evaluation.predictions import score_classifier, validation_batches

    bad = [alpha for alpha in alphas if not 0.0 <= alpha <= 1.0]
    if bad or not alphas:
        raise ConfigError(f"--alpha-sweep values must lie in [0, 1], got {list(alphas)}")
    check_output_folder(first, second, out_dir, overwrite)
    check_compatible(first, second)
    weights_a, weights_b = read_weights(first), read_weights(second)
    tokenizer = AutoTokenizer.from_pretrained(first)
    model = AutoModelForSequenceClassification.from_pretrained(first).eval()
    loader, num_labels = validation_batches(cfg, tokenizer)
    rows: List[Dict] = []
    for alpha in alphas:
        model.load_state_dict(interpolate_weights(weights_a, weights_b, alpha), strict=False)
        rows.append({"alpha": alpha, **score_classifier(model, loader, num_labels)})
    best = max(rows, key=lambda row: (row["accuracy"], -row["nll"], -rows.index(row)))
    out = write_interpolated(first, second, out_dir, best["alpha"], overwrite)
    (out / "alpha_sweep.json").write_text(json.dumps({"rows": rows, "best_alpha": best["alpha"]}, indent=2))
    plot_sweep(rows, best["alpha"], out / "alpha_sweep.png", first, second)
    return {"rows": rows, "best": best, "out_dir": str(out)}


def format_sweep(rows: List[Dict], best_alpha: float) -> str:
    from distill.evaluation.report import text_table

    cells = [(f"{row['alpha']:.3f}", f"{row['accuracy']:.4f}", f"{row['macro_f1']:.4f}", f"{row['nll']:.4f}",
              "<- best" if row["alpha"] == best_alpha else "") for row in rows]
    return text_table(("alpha", "accuracy", "macro-F1", "NLL", ""), cells)


def plot_sweep(rows: List[Dict], best_alpha: float, path: Path, first: Path, second: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    alphas = [row["alpha"] for row in rows]
    axis.plot(alphas, [row["accuracy"] for row in rows], "o-", label="accuracy")
    axis.plot(alphas, [row["macro_f1"] for row in rows], "s--", label="macro-F1")
    axis.axvline(best_alpha, color="grey", linestyle=":", label=f"best alpha = {best_alpha:g}")
    axis.set_xlabel(f"alpha  (0 = {Path(second).name}, 1 = {Path(first).name})")
    axis.set_ylabel("validation")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
