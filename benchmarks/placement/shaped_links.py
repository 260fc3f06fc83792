"""The placement cost model against links of a known speed.

    python benchmarks/placement/shaped_links.py --rates none,400mbit,100mbit --json results/shaped_links.json

Two emulated nodes, each its own network namespace joined through a switch namespace
(tests/helpers/shaped_network.py; needs root and iproute2), one rank per node. For every link rate it
shapes both directions of both links with ``tc tbf`` and runs ``dispatch_bench.py`` across the two
nodes: the replicated step and the expert-parallel one, each with the cost model calibrated on the
shaped group at start-up, and what ``--ep_size auto`` would choose there. The table shows, per
rate:

- the set rate as TCP payload (tbf counts frame bytes; payload is 1448/1514 of them), the
  bandwidth the calibration recovered from the all-reduce (beta) and from the peers-only
  all-to-all, and their errors against the set rate;
- alpha as calibrated (latency cannot be set here: the kernel has no ``netem``);
- measured and predicted step per placement, the measured winner and the auto choice.

The default layer (d=1024, 8 experts of rank 32, top-1 routing, 32 tokens per rank: other layers
with extra dispatch_bench flags) is one where replication moves more bytes (its expert gradients,
2.1 MB all-reduced per step) than expert parallelism (0.5 MB of rows per step over both ranks): on
a fast link replication wins (no dispatch), on a slow one the bytes decide.

The bandwidth check uses a probe of ``--probe_bytes`` (4 MB) per collective, far above the token
bucket (64 KiB or 2 ms of traffic), because tbf lets a smaller transfer after a pause through at
once: the jobs' own calibration, at their sizes, is in the records as ``job_*``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common.records import write_records

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the test suite's network harness (tests.helpers), from a checkout
DISPATCH_BENCH = str(REPO / "benchmarks" / "placement" / "dispatch_bench.py")

LAYER = ["--hidden", "1024", "--num_experts", "8", "--rank", "32", "--method", "mole_topk", "--top_k", "1",
         "--tokens_per_rank", "32"]


def parse_rate(text: str) -> float | None:
    """'none' (unshaped), '<n>mbit' / '<n>gbit' (bits per second, as tc writes them) or bytes/s."""
    text = text.strip().lower()
    if text == "none":
        return None
    m = re.fullmatch(r"([0-9.]+)\s*(k|m|g)bit", text)
    if m:
        return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8
    return float(text)


def run_across(net, argv: list[str], port: int, timeout: float) -> str:
    """``argv`` (a gloo job) with one rank in each node's namespace, rendezvous at node 1's
    address; rank 0's standard output, which is also echoed."""
    procs = []
    for node in net.nodes:
        env = net.env(node, dict(os.environ, RANK=str(node - 1), LOCAL_RANK="0", WORLD_SIZE=str(len(net.nodes)),
                                 MASTER_ADDR=net.address(1), MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
        procs.append(subprocess.Popen(net.command(node, argv), env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE if node == 1 else subprocess.DEVNULL))
    try:
        out = procs[0].communicate(timeout=timeout)[0]
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(out, end="", flush=True)
    if any(codes):
        raise SystemExit(f"{Path(argv[1]).name} failed across the shaped link: exit codes {codes}")
    return out


def probe_worker(nbytes: int) -> None:
    """One rank of the link probe: alpha and beta as the calibration measures them, with an
    all-reduce and a peers-only all-to-all of ``nbytes`` (rank 0 prints them as JSON)."""
    import torch
    import torch.distributed as dist

    from adamole_dist.costmodel.calibration import measure_comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    comm = measure_comm(large=nbytes, a2a_bytes=nbytes, repeats=9)
    if dist.get_rank() == 0:
        print("PROBE " + json.dumps({"bytes": nbytes, "alpha_s": comm.alpha_intra, "beta_Bps": comm.beta_intra,
                                     "a2a_alpha_s": comm.alpha_intra * comm.a2a_alpha_scale,
                                     "a2a_beta_Bps": comm.beta_intra * comm.a2a_beta_scale}))
    dist.destroy_process_group()


def probe(net, nbytes: int, port: int, timeout: float) -> dict:
    out = run_across(net, [sys.executable, __file__, "--probe_worker", str(nbytes)], port, timeout)
    return json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[6:])


def summarise(rate: float | None, link: dict, records: list[dict]) -> dict:
    from tests.helpers.shaped_network import payload_rate

    by_ep = {r["ep_size"]: r for r in records}
    rep, ep = by_ep[1], by_ep[max(by_ep)]
    set_payload = payload_rate(rate) if rate else None
    err = (lambda b: round(b / set_payload - 1, 4)) if set_payload else (lambda b: None)
    measured_winner = min(records, key=lambda r: r["ms_step_median"])["ep_size"]
    return {
        "rate_Bps": rate, "set_payload_Bps": set_payload, "probe_bytes": link["bytes"],
        "beta_Bps": link["beta_Bps"], "beta_error": err(link["beta_Bps"]),
        "a2a_beta_Bps": link["a2a_beta_Bps"], "a2a_beta_error": err(link["a2a_beta_Bps"]),
        "alpha_s": link["alpha_s"], "a2a_alpha_s": link["a2a_alpha_s"],
        # what the jobs' own start-up calibration saw, at their sizes
        "job_beta_Bps": rep["calibration"]["beta_Bps"], "job_a2a_beta_Bps": ep["calibration"]["a2a_beta_Bps"],
        "replicated_ms": rep["ms_step_median"], "replicated_predicted_ms": rep["predicted_ms_step"],
        "ep_ms": ep["ms_step_median"], "ep_predicted_ms": ep["predicted_ms_step"],
        "measured_winner": measured_winner, "auto_ep_size": rep["auto_ep_size"],
        "records": records,
    }


def table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / 1e6:.1f}" if b else "-"  # noqa: E731
    pct = lambda e: f"{100 * e:+.1f}%" if e is not None else "-"  # noqa: E731
    lines = [f"{'link (payload MB/s)':>20}{'beta MB/s':>11}{'err':>8}{'a2a MB/s':>10}{'err':>8}{'alpha us':>10}"
             f"{'rep ms (pred)':>16}{'EP ms (pred)':>16}{'faster':>8}{'auto':>6}"]
    for r in rows:
        winner = "rep" if r["measured_winner"] == 1 else "EP"
        auto = "rep" if r["auto_ep_size"] == 1 else "EP"
        lines.append(f"{mb(r['set_payload_Bps']) if r['rate_Bps'] else 'unshaped':>20}{mb(r['beta_Bps']):>11}"
                     f"{pct(r['beta_error']):>8}{mb(r['a2a_beta_Bps']):>10}{pct(r['a2a_beta_error']):>8}"
                     f"{1e6 * r['alpha_s']:>10.0f}"
                     f"{r['replicated_ms']:>8.1f} ({r['replicated_predicted_ms']:>5.1f})"
                     f"{r['ep_ms']:>8.1f} ({r['ep_predicted_ms']:>5.1f}){winner:>8}{auto:>6}")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the rest: extra dispatch_bench flags for the layer."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="none,400mbit,100mbit",
                    help="link rates, comma separated: none (unshaped), <n>mbit/<n>gbit, or bytes/s")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--port", type=int, default=29741)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per rate")
    ap.add_argument("--probe_bytes", type=int, default=4 << 20,
                    help="bytes of the link probe's all-reduce and all-to-all (well above the token bucket)")
    ap.add_argument("--probe_worker", type=int, help=argparse.SUPPRESS)  # one rank of the probe
    ap.add_argument("--json", type=Path)
    return ap.parse_known_args(argv)


def run(args, layer: list[str]) -> list[dict]:
    """One row per --rates entry: the link probed, then dispatch_bench across it."""
    from tests.helpers.shaped_network import ShapedNetwork, missing_tools

    missing = missing_tools()
    if missing:
        raise SystemExit(f"shaped links need {', '.join(missing)}")
    bench_args = [*LAYER, *layer, "--steps", str(args.steps), "--threads", "1"]
    rows = []
    with ShapedNetwork(nodes=2) as net, tempfile.TemporaryDirectory() as tmp:  # removed on any exit
        for i, text in enumerate(args.rates.split(",")):
            rate = parse_rate(text)
            net.shape(rate)
            out = Path(tmp) / f"rate{i}.json"
            print(f"== link {text}: probe of {args.probe_bytes} bytes", flush=True)
            link = probe(net, args.probe_bytes, args.port + 2 * i, args.timeout)
            print(f"== link {text}: dispatch_bench {' '.join(bench_args)}", flush=True)
            run_across(net, [sys.executable, DISPATCH_BENCH, *bench_args, "--json", str(out)], args.port + 2 * i + 1,
                       args.timeout)
            rows.append(summarise(rate, link, json.loads(out.read_text())))
    return rows


def report(rows: list[dict], args) -> None:
    from tests.helpers.shaped_network import has_netem

    print(table(rows))
    print(f"netem (latency) available: {has_netem()}")
    if args.json:
        write_records(args.json, rows, announce=True)


def main(argv=None) -> None:
    args, layer = parse_args(argv)
    if args.probe_worker:
        return probe_worker(args.probe_worker)
    report(run(args, layer), args)


if __name__ == "__main__":
    main()
