"""adamole-serve under concurrent clients: SmolLM2-135M with an adamole adapter (8 experts x r=4 on q,k,v,o, the
paper's shape) and the base alone, N concurrent clients with fixed chat prompts and max_tokens.

    python benchmarks/serving/serve_bench.py --json benchmarks/results/serve_bench.json

Per (model, clients): requests/s, output tokens/s, time to first token and latency (p50, p95), failed requests,
and whether each answer equals the same request's answer at one client (greedy). The baseline: the same
requests one at a time through launch/generate.py's path (``generate_batch`` at batch size 1, in process,
the load not timed), and all at once as one batch of its batch mode. Then the cost of several adapters on
one base: the clients spread over two adamole adapters (the scheduler runs a batch per adapter, in turn)
against all on one. Every scenario runs --passes times; the server's resident memory after each pass shows
whether it leaks. Reported: medians over the passes; the ratios come from the same run.

The adapters are untrained: default router init (the gate and the threshold network route every token,
3-5 of 8 experts fire), lora_A at its init and lora_B drawn at std --delta_std, so they change the answers
a little; what a token costs does not depend on training. Replies have a fixed length (``ignore_eos``; the
baseline ``min_new_tokens``), so every configuration generates the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common.records import write_records

PROMPTS = ["Name three colours.", "What is the capital of France?", "Write a haiku about the sea.",
           "Explain why the sky is blue in one sentence.", "Give me two tips for learning to cook.",
           "What is 12 times 7?", "Describe a cat to someone who has never seen one.", "List four fruits.",
           "Why do leaves change colour in autumn?", "Suggest a name for a small red boat.",
           "What does a carpenter do?", "Translate 'good morning' into Spanish.",
           "Write one sentence about the moon.", "How many legs does a spider have?",
           "What is the opposite of cold?", "Tell me a fun fact about octopuses."]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per scenario")
    ap.add_argument("--requests", type=int, default=16, help="requests per scenario (the fixed prompts, cycled)")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--delta_std", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the server and the baseline (default: torch's, one per core)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def make_adapter(base: str, folder: Path, seed: int, delta_std: float) -> Path:
    """An untrained adamole adapter (see the module docstring) saved as training saves one."""
    from adamole_dist.adapters.files import adapter_state, save_adapter
    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.base_model.model_loading import load_model_and_tokenizer
    from adamole_dist.config.adapter import AdapterConfig

    model, _, _, path = load_model_and_tokenizer(base, "causal_lm")
    torch.manual_seed(seed)
    adapters = inject_adapters(model, AdapterConfig(method="adamole", num_experts=8, rank=4, alpha=16, dropout=0.0))
    with torch.no_grad():
        for bank in adapters.expert_banks.values():
            bank.lora_B.normal_(0.0, delta_std)
    meta = {"base_model": base, "base_model_path": path, "task_type": "causal_lm", "pooling": "cls",
            "trainable_modules": [], "step": 0, "prompt_format": "chat"}
    save_adapter(folder, adapter_state(adapters), adapters.cfg, meta)
    return folder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(url: str, model: str, prompt: str, max_tokens: int, fixed: bool = True) -> dict:
    """A streamed chat completion (``fixed``: all max_tokens, ignore_eos): its text, completion tokens, time
    to first token and latency (s)."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": fixed, "stream": True}
    start, first, text, tokens = time.perf_counter(), None, "", 0
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                return {"failed": f"HTTP {response.status_code}"}
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                doc = json.loads(line[6:])
                if doc.get("error"):
                    return {"failed": doc["error"]["message"]}
                if doc["choices"]:
                    first = first or time.perf_counter()
                    text += doc["choices"][0]["delta"].get("content") or ""
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"failed": repr(e)}
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "ttft": (first or end) - start, "latency": end - start}


def scenario(url: str, models: list[str], clients: int, requests: int, max_tokens: int, fixed: bool = True) -> dict:
    """``requests`` requests (prompt k % 16, model k % len(models)) from ``clients`` threads at once, each
    thread sending its share one after another."""
    jobs = [(models[k % len(models)], PROMPTS[k % len(PROMPTS)]) for k in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: one_request(url, job[0], job[1], max_tokens, fixed), jobs))
    wall = time.perf_counter() - start
    ok = [r for r in results if "failed" not in r]
    return {"models": "+".join(models), "clients": clients, "requests": requests, "wall_s": wall,
            "failed": len(results) - len(ok), "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": percentile([r["ttft"] for r in ok], 0.5), "ttft_p95_s": percentile([r["ttft"] for r in ok],
                                                                                              0.95),
            "latency_p50_s": percentile([r["latency"] for r in ok], 0.5),
            "latency_p95_s": percentile([r["latency"] for r in ok], 0.95),
            "texts": [r.get("text") for r in results]}


def baseline(model_name: str, adapter: Path | None, requests: int, max_tokens: int) -> list[dict]:
    """launch/generate.py's path in process (generate_batch, greedy): the requests one at a time and all as
    one batch at the fixed length, then one at a time stopping at the stop tokens as the server's check
    requests do (their answers compared); load not timed."""
    from adamole_dist.generation.batched import generate_batch, sampling_options
    from adamole_dist.generation.loading import load_for_generation
    from adamole_dist.generation.prompts import PromptRenderer

    model, tokenizer, adapters = load_for_generation(adapter, None if adapter else model_name, "cpu")
    renderer = PromptRenderer(tokenizer, "chat")
    rows = [renderer.ids({"messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}]})
            for k in range(requests)]
    fixed = {**sampling_options(max_tokens), "min_new_tokens": max_tokens}
    records = []
    for kind, batch_size, options in (("generate_batch", 1, fixed), ("generate_batch", requests, fixed),
                                      ("generate_check", 1, sampling_options(max_tokens))):
        start, texts, tokens = time.perf_counter(), [], 0
        for at in range(0, requests, batch_size):
            for out in generate_batch(model, tokenizer, rows[at: at + batch_size], options, adapters=adapters):
                texts.append(out["text"])
                tokens += len(out["ids"])
        wall = time.perf_counter() - start
        records.append({"kind": kind, "model": "adamole" if adapter else "base", "batch_size": batch_size,
                        "wall_s": wall, "output_tokens_per_s": tokens / wall, "requests_per_s": requests / wall,
                        "texts": texts})
    return records


def start_server(model: str, adapters: dict[str, Path], max_batch_size: int,
                 threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "adamole_dist.cli.serve", "--model", model, "--port", "0", "--max_batch_size",
           str(max_batch_size), "--max_queue", "1024"] + [a for n, d in adapters.items() for a in ("--adapter",
                                                                                                    f"{n}={d}")]
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        match = re.search(r" on (http://\S+) ", line)
        if match:
            return proc, match.group(1)
    raise SystemExit(f"the server exited ({proc.wait()}) before listening")


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def serve_passes(args, url: str, pid: int, clients: list[int]) -> list[dict]:
    records = []
    for p in range(args.passes):
        for models in (["adamole"], ["base"]):
            for n in clients:
                records.append({"kind": "serve", "pass": p, **scenario(url, models, n, args.requests, args.max_tokens)})
        records.append({"kind": "serve", "pass": p, **scenario(url, ["adamole", "adamole_b"], max(clients),
                                                                args.requests, args.max_tokens)})
        records.append({"kind": "memory", "pass": p, "rss_mb": resident_mb(pid)})
        print(f"pass {p + 1}/{args.passes} done, server RSS {records[-1]['rss_mb']:.0f} MB", flush=True)
    return records


def annotate(records: list[dict]) -> list[dict]:
    """Each serve record's answers against the same pass's one-client answers for its models, the check
    requests' answers against generate_batch's one at a time; the texts themselves dropped."""
    alone = {(r["pass"], r["models"]): r["texts"] for r in records if r["kind"] == "serve" and r["clients"] == 1}
    reference = {r["model"]: r["texts"] for r in records if r["kind"] == "generate_check"}
    for r in records:
        same = alone.get((r.get("pass"), r.get("models"))) if r["kind"] == "serve" else None
        if same is not None:
            r["identical_to_one_client"] = sum(a == b for a, b in zip(r["texts"], same))
        if r["kind"] == "check":
            r["identical_to_generate"] = sum(a == b for a, b in zip(r["texts"], reference[r["models"]]))
    return [{k: v for k, v in r.items() if k != "texts"} for r in records]


def run(args) -> list[dict]:
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(args.model, Path(tmp) / "adamole", 0, args.delta_std)
        second = make_adapter(args.model, Path(tmp) / "adamole_b", 1, args.delta_std)
        records = baseline(args.model, None, args.requests, args.max_tokens)
        records += baseline(args.model, adapter, args.requests, args.max_tokens)
        proc, url = start_server(args.model, {"adamole": adapter, "adamole_b": second}, max(clients), args.threads)
        try:
            for model in ("adamole", "base"):  # warm-up
                one_request(url, model, "hi", 4)
            records += serve_passes(args, url, proc.pid, clients)
            for model in ("adamole", "base"):  # answers stopping at the stop tokens, against generate_batch's
                records.append({"kind": "check", **scenario(url, [model], 1, args.requests, args.max_tokens, False)})
        finally:
            proc.terminate()
            proc.wait(120)
    return annotate(records)


def median_of(records: list[dict], key: str, **match) -> float:
    values = [r[key] for r in records if all(r.get(k) == v for k, v in match.items())]
    return statistics.median(values) if values else float("nan")


def report(records: list[dict]) -> str:
    serve = [r for r in records if r["kind"] == "serve"]
    lines = ["| server: models | clients | req/s | out tok/s | TTFT p50 / p95 s | latency p50 / p95 s | failed | "
             "= 1 client |", "|---|---|---|---|---|---|---|---|"]
    for models, clients in sorted({(r["models"], r["clients"]) for r in serve}, key=lambda mc: (mc[0], mc[1])):
        m = {"models": models, "clients": clients, "kind": "serve"}
        group = [r for r in serve if r["models"] == models and r["clients"] == clients]
        same = (f"{sum(r['identical_to_one_client'] for r in group)}/{sum(r['requests'] for r in group)}"
                if clients > 1 and "identical_to_one_client" in group[0] else "–")
        lines.append(f"| {models} | {clients} | {median_of(records, 'requests_per_s', **m):.2f} | "
                     f"{median_of(records, 'output_tokens_per_s', **m):.1f} | "
                     f"{median_of(records, 'ttft_p50_s', **m):.2f} / {median_of(records, 'ttft_p95_s', **m):.2f} | "
                     f"{median_of(records, 'latency_p50_s', **m):.2f} / "
                     f"{median_of(records, 'latency_p95_s', **m):.2f} | {sum(r['failed'] for r in group)} | {same} |")
    lines += ["", "| generate_batch (launch/generate.py's path) | batch size | req/s | out tok/s |",
              "|---|---|---|---|"]
    for r in (r for r in records if r["kind"] == "generate_batch"):
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} |")
    lines += ["", ratios(records)]
    return "\n".join(lines)


def ratios(records: list[dict]) -> str:
    top = max(r["clients"] for r in records if r["kind"] == "serve")

    def tps(models, clients):
        return median_of(records, "output_tokens_per_s", kind="serve", models=models, clients=clients)

    one_at_a_time = median_of(records, "output_tokens_per_s", kind="generate_batch", model="adamole", batch_size=1)
    rss = [r["rss_mb"] for r in records if r["kind"] == "memory"]
    checks = [r for r in records if r["kind"] == "check"]
    same_gen, ones = sum(r["identical_to_generate"] for r in checks), sum(r["requests"] for r in checks)
    return "\n".join([
        f"- {top} clients / 1 client, output tokens/s: adamole {tps('adamole', top) / tps('adamole', 1):.2f}x, "
        f"base {tps('base', top) / tps('base', 1):.2f}x (target >= 4)",
        f"- adamole / base at {top} clients: {tps('adamole', top) / tps('base', top):.2f} (target >= 0.8); "
        f"at 1 client: {tps('adamole', 1) / tps('base', 1):.2f}",
        f"- {top} clients over two adapters / all on one: "
        f"{tps('adamole+adamole_b', top) / tps('adamole', top):.2f} (a batch per adapter, taken in turn)",
        f"- server at {top} clients / generate_batch one at a time (adamole): "
        f"{tps('adamole', top) / one_at_a_time:.2f}x",
        f"- failed requests: {sum(r['failed'] for r in records if r['kind'] in ('serve', 'check'))}; answers (stopping "
        f"at the stop tokens) equal to generate_batch's one at a time: {same_gen}/{ones}",
        f"- server RSS after each pass (MB): {', '.join(f'{m:.0f}' for m in rss)}"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run(args)
    print(report(records))
    if args.json:
        write_records(args.json, records, announce=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
