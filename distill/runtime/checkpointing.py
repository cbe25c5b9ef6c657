"""What a checkpoint holds beyond DeepSpeed's own files, so a resumed run continues exactly.

- every rank's RNG states (python, numpy, torch), in `rng_rank<R>.safetensors` + `.json`;
- `distill_manifest.json`: the config that made it, the teachers (path, content hash, weight,
  temperature), the interpolation state, and the data position (epoch, batches consumed);
- a resume refuses config changes that would make it unsafe, naming the changed keys.

DeepSpeed writes the `latest` file only after all of a tag's files are saved, and a tag is only
picked through `latest`, so a checkpoint killed half-way is never chosen.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

MANIFEST = "distill_manifest.json"
LATEST = "latest"  # DeepSpeed's pointer to the newest complete tag



def write_failure_advice(error: BaseException) -> str:
    """What to do when a checkpoint could not be written: a folder that refuses writes (read-only,
    not ours) is not a full disk."""
    import errno

    denied = (isinstance(error, PermissionError) or getattr(error, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS)
              or any(text in str(error) for text in ("Permission denied", "Read-only file system")))
    return "make the checkpoints folder writable (it is read-only or not yours)" if denied else \
        "free space (or raise the quota)"


@contextlib.contextmanager
def only_tensors():
    """While DeepSpeed reads a checkpoint: torch.load with weights_only=True, whatever the caller
    asks (DeepSpeed's zero_to_fp32 asks for weights_only=False). A handed-over checkpoint is a
    pickle: with weights_only it can hold tensors, plain containers and the three plain-data
    DeepSpeed types allowed here, never code to run."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        # the plain-data types DeepSpeed's ZeRO optimizer states hold (restored by setting fields)
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        torch.load = original


def latest_complete_tag(root: Path):
    latest = root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if is_plain_tag(tag) and (root / tag).is_dir() else None


def is_plain_tag(tag: str) -> bool:
    """A tag names a folder directly inside checkpoints/: no path separator, no '..', not empty."""
    return bool(tag) and "/" not in tag and "\\" not in tag and tag not in (".", "..") and not tag.startswith("~")


FILES = "files"  # the manifest's key: {relative path: sha256} of every file of the tag, written once it is whole


def tag_files(folder: Path) -> Dict[str, str]:
    """sha256 of every file in a tag's folder but the manifest itself, by path relative to it."""
    return {str(path.relative_to(folder)): file_hash(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in (MANIFEST, MANIFEST + ".tmp")}


def seal_manifest(folder: Path) -> None:
    """Record every file's digest in the tag's manifest, once all ranks have written (rank 0)."""
    manifest = read_manifest(folder)
    manifest[FILES] = tag_files(folder)
    temporary = folder / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    temporary.replace(folder / MANIFEST)


def damage(folder: Path, require_manifest: bool = True) -> Optional[str]:
    """Why the checkpoint in `folder` cannot be trusted, or None if it is whole: its manifest missing
    (where a resume needs it) or unreadable, its digests never recorded (the write was cut), a file
    missing or changed. A manifest of an earlier version (no digests at all) is taken as it is."""
    if not folder.is_dir():
        return "the folder does not exist"
    path = folder / MANIFEST
    if not path.is_file():
        return f"it has no {MANIFEST}" if require_manifest else None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    if FILES not in manifest:
        return None  # written before digests were recorded: nothing to check against
    recorded = manifest[FILES]
    if not isinstance(recorded, dict):
        return "its writing did not finish (no file digests were recorded)"
    present = {str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")}
    for name in sorted(recorded):
        if name not in present:
            return f"{name} is missing"
        if file_hash(folder / name) != recorded[name]:
            return f"{name} differs from the digest recorded when it was written (truncated or altered)"
    return None


def newest_intact_tag(root: Path, require_manifest: bool = True) -> Tuple[Optional[str], List[str]]:
    """(the newest whole checkpoint's tag or None, one line per newer tag passed over with its reason).
    Only folders directly inside `root` count; `latest` names the newest, older `step*` tags follow."""
    latest = root / LATEST
    named = latest.read_text().strip() if latest.is_file() else ""
    if named and not is_plain_tag(named):
        from distill.errors import ConfigError

        raise ConfigError(f"{latest} names {named!r}, which is not a checkpoint of this run (a tag is a folder "
                          f"inside {root}): remove that file, or write the name of one of its step folders in it")
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")), reverse=True) \
        if root.is_dir() else []
    if named:
        tags = [named] + [tag for tag in tags if tag < named]
    passed = []
    for tag in tags:
        reason = damage(root / tag, require_manifest)
        if reason is None:
            return tag, passed
        passed.append(f"checkpoint {tag}: {reason}")
    return None, passed


BEST = "best.json"  # training.select_best: the best evaluation's checkpoint tag, step, metric and figures


def read_best(root: Path) -> Optional[Dict]:
    """The run's best-checkpoint record, or None (none written, unreadable, or naming no folder of `root`)."""
    path = root / BEST
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    tag = record.get("tag") if isinstance(record, dict) else None
    if not isinstance(tag, str) or not is_plain_tag(tag) or not (root / tag).is_dir():
        return None
    return record


def write_best(root: Path, record: Dict) -> None:
    """The best-checkpoint record, written beside and renamed into place."""
    temporary = root / (BEST + ".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(root / BEST)


def restore_latest(root: Path, tag) -> None:
    """Point `latest` back at `tag` (or remove it when there was none), replacing it atomically."""
    latest = root / LATEST
    if tag is None:
        latest.unlink(missing_ok=True)
        return
    temporary = root / (LATEST + ".tmp")
    try:
        temporary.write_text(tag)
        temporary.replace(latest)
    except OSError:  # even a few bytes do not fit: drop the pointer rather than leave it naming a gone tag
        temporary.unlink(missing_ok=True)
        if latest.is_file() and latest.read_text().strip() != tag:
            latest.unlink()

# Keys a resumed run may change: they alter logging, evaluation or how long it runs, not what it learns.
RESUME_SAFE_PREFIXES = ("training.log_every", "training.eval_every", "training.checkpoint_every",
                        "training.select_best", "training.ignore_memory_plan",
                        "training.keep_checkpoints", "training.progress_bar", "training.resume",
                        "training.max_steps", "training.epochs", "training.eval_batch_size", "export.",
                        "output_dir")


class ResumableSampler(Sampler):
    """A DistributedSampler's order for an epoch, starting after the samples already consumed.

    Skipping happens in index space (no batches are collated to be thrown away), and the order
    depends only on (seed, epoch), never on the global RNG."""

    def __init__(self, base):
        self.base = base
        self.skip = 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(iter(self.base))
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def save_rng_state(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    numpy_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / f"rng_rank{rank}.safetensors"))
    python_state = random.getstate()
    (folder / f"rng_rank{rank}.json").write_text(json.dumps({
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]}))


def load_rng_state(folder: Path, rank: int) -> bool:
    from safetensors.torch import load_file

    tensor_path = folder / f"rng_rank{rank}.safetensors"
    if not tensor_path.is_file():
        return False
    tensors = load_file(str(tensor_path))
    states = json.loads((folder / f"rng_rank{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    name, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return True


def content_hash(model_dir: str) -> str:
    """sha256 over a model folder's weight and config files (what makes a teacher that teacher)."""
    from distill.util.paths import is_local_reference, resolve_path

    if not is_local_reference(model_dir):
        return f"hub:{model_dir}"
    folder = resolve_path(model_dir)
    if folder.is_file():  # a black-box teacher's outputs file
        return file_hash(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".safetensors", ".json") and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_hashes(cfg) -> Dict[str, str]:
    """sha256 of every local input a run reads besides its teachers: the data files (train,
    validation, unlabeled, mixture sources, evaluation domains) and the student's checkpoint folder
    (its weights, config and tokenizer), by config key. A resume that finds one changed is refused."""
    from distill.util.paths import is_local_reference, resolve_path

    references = {f"data.{split}.path": cfg.data[split].path for split in ("train", "validation", "unlabeled")}
    references.update({f"data.mixture_sources[{i}].path": source.path for i, source in enumerate(cfg.data.mixture_sources)})
    references.update({f"data.eval_domains[{i}].path": domain.path for i, domain in enumerate(cfg.data.eval_domains)})
    hashes = {}
    for key, reference in references.items():
        if reference is None or not is_local_reference(reference):
            continue
        path = resolve_path(reference)
        if path.is_file():
            hashes[key] = file_hash(path)
        elif path.is_dir():
            hashes[key] = hashlib.sha256("".join(file_hash(f) for f in sorted(path.rglob("*")) if f.is_file())
                                         .encode()).hexdigest()
    if cfg.student.path is not None:
        hashes["student.path"] = content_hash(cfg.student.path) + content_hash_of_tokenizer(cfg.student.path)
    return hashes


def content_hash_of_tokenizer(model_dir: str) -> str:
    """sha256 of a model folder's tokenizer files beyond its JSON (e.g. a SentencePiece model)."""
    from distill.util.paths import is_local_reference, resolve_path

    if not is_local_reference(model_dir):
        return ""
    folder = resolve_path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.is_file() and path.suffix in (".model", ".txt", ".merges"):
            digest.update(path.name.encode() + file_hash(path).encode())
    return digest.hexdigest()


def write_manifest(folder: Path, config: Dict, teachers: List[Dict], interpolation: Dict, position: Dict,
                   inputs: Dict[str, str] = None) -> None:
    """The tag's manifest, written before its files; `files` stays None until `seal_manifest` records
    their digests, so a tag whose writing was cut is told from a whole one."""
    manifest = {"config": config, "teachers": teachers, "interpolation": interpolation, "position": position,
                "inputs": inputs or {}, FILES: None}
    temporary = folder / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    temporary.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> Dict:
    return json.loads((folder / MANIFEST).read_text())


def _flatten(value, prefix: str = "") -> Dict[str, object]:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    if isinstance(value, list):
        flat = {}
        for index, inner in enumerate(value):
            flat.update(_flatten(inner, f"{prefix}{index}."))
        return flat or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): value}


def unsafe_changes(saved: Dict, current: Dict) -> List[str]:
    """Dotted keys whose values differ between two configs, less those safe to change on resume."""
    before, after = _flatten(saved), _flatten(current)
    changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
    return [key for key in changed if not key.startswith(RESUME_SAFE_PREFIXES)]
