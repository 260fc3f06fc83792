"""benchmarks/serving/serve_bench.py's bookkeeping: answers compared with the one-client pass and with
generate_batch, medians over passes, the ratios the targets are read from."""

from benchmarks.serving.serve_bench import annotate, percentile, report


def serve(p, models, clients, tps, texts, failed=0):
    return {"kind": "serve", "pass": p, "models": models, "clients": clients, "requests": len(texts),
            "wall_s": 1.0, "failed": failed, "requests_per_s": 1.0, "output_tokens_per_s": tps, "ttft_p50_s": 0.1,
            "ttft_p95_s": 0.2, "latency_p50_s": 1.0, "latency_p95_s": 2.0, "texts": texts}


def test_percentile_picks_the_nearest_rank():
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile(list(range(21)), 0.95) == 19


def test_answers_are_compared_and_ratios_come_from_medians():
    records = [{"kind": "generate_batch", "model": "adamole", "batch_size": 1, "requests_per_s": 1.0,
                "output_tokens_per_s": 10.0, "texts": ["a", "b"]},
               {"kind": "generate_check", "model": "adamole", "batch_size": 1, "texts": ["a", "b"]},
               {"kind": "generate_check", "model": "base", "batch_size": 1, "texts": ["x", "y"]}]
    for p, (one, many, base_one, base_many) in enumerate([(10, 50, 12, 60), (11, 55, 12, 70), (9, 40, 13, 65)]):
        records += [serve(p, "adamole", 1, one, ["a", "b"]), serve(p, "adamole", 16, many, ["a", "c" if p else "b"]),
                    serve(p, "base", 1, base_one, ["x", "y"]), serve(p, "base", 16, base_many, ["x", "y"]),
                    serve(p, "adamole+adamole_b", 16, many / 2, ["a", "b"]), {"kind": "memory", "pass": p,
                                                                              "rss_mb": 1000.0 + p}]
    records += [{**serve(0, "adamole", 1, 10, ["a", "z"]), "kind": "check"},
                {**serve(0, "base", 1, 12, ["x", "y"]), "kind": "check"}]
    out = annotate(records)
    assert all("texts" not in r for r in out)
    assert [r["identical_to_one_client"] for r in out if r["kind"] == "serve" and r["models"] == "adamole"
            and r["clients"] == 16] == [2, 1, 1]
    assert [r["identical_to_generate"] for r in out if r["kind"] == "check"] == [1, 2]
    text = report(out)
    assert "| adamole | 16 | 1.00 | 50.0 |" in text and "| 4/6 |" in text  # medians; 4 of 6 answers equal
    assert "adamole 5.00x, base 5.42x" in text  # 50 / 10 and 65 / 12
    assert "adamole / base at 16 clients: 0.77" in text  # 50 / 65
    assert "all on one: 0.50" in text and "3/4" in text and "1000, 1001, 1002" in text
    assert "generate_batch one at a time (adamole): 5.00x" in text  # 50 / 10
