"""The README's results table is written from the benchmark JSON (benchmarks/tables.py), never typed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("td_bench_tables", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prefill(created: str, pic_latency: float) -> dict:
    row = lambda lat, unc: {"latency_s": lat, "server_cpu_s": 2 * lat, "uncached_tokens": unc}  # noqa: E731
    return {
        "quick": True, "environment": {"created": created, "device": "cpu", "cpu_count": 2},
        "settings": {"timed_round": 1, "max_new_tokens_untimed": 16, "repeats": 1, "agents": [10]},
        "results": {"radix": {"10": row(9.0, 4000)}, "pic": {"10": row(pic_latency, 1200)},
                    "tokendance": {"10": row(3.0, 900)}},
        "ratios": {"10": {
            "radix_over_tokendance": {"latency": 3.0, "server_cpu": 3.0, "uncached_tokens": 4000 / 900},
            "pic_over_tokendance": {"latency": pic_latency / 3.0, "server_cpu": pic_latency / 3.0,
                                    "uncached_tokens": 1200 / 900}}},
    }


def test_block_comes_from_the_newest_json_and_replaces_the_old_block(tables, tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "prefill.json").write_text(json.dumps(_prefill("2026-01-01T00:00:00", 4.5)))
    (res / "prefill_quick.json").write_text(json.dumps(_prefill("2026-02-01T00:00:00", 6.0)))
    data = {"prefill": tables.load("prefill", "auto", res)}
    assert data["prefill"]["_path"] == "prefill_quick.json"  # the newer one
    block = tables.render(data)
    assert block.startswith(tables.BEGIN) and block.rstrip().endswith(tables.END)
    assert "2.00x" in block and "3.00x" in block and "| 6.00 |" in block  # pic/td and radix/td latency, pic time

    target = tmp_path / "README.md"
    target.write_text("# title\n\nbefore\n\n" + tables.render({}) + "\nafter\n")
    assert "No benchmark results yet" in target.read_text()
    tables.write_block(target, block)
    tables.write_block(target, block)  # idempotent
    text = target.read_text()
    assert text.count(tables.BEGIN) == 1 and "No benchmark results yet" not in text
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\nafter\n") and "2.00x" in text

    main_target = tmp_path / "out.md"
    assert tables.main(["--results-dir", str(res), "--target", str(main_target)]) == 0
    assert "2.00x" in main_target.read_text()


def test_compression_row_reads_the_dense_measure_of_the_largest_n(tables):
    rec = lambda d: [{"dense_over_shared": 1.0}, {"dense_over_shared": d}]  # noqa: E731
    scale = {"_path": "storage_scale.json", "settings": {"rounds": 2, "max_new_tokens": 96},
             "servers": {"tokendance": {"recompute_policy": "sink:2"}},
             "results": {"tokendance": {"16": rec(9.0), "32": rec(18.25)}}}
    rows = tables.compression_rows({"storage_scale": scale})
    assert len(rows) == 1 and "N = 32" in rows[0][0] and "`sink:2`" in rows[0][0] and rows[0][3] == "18.25x"
    old = {**scale, "results": {"tokendance": {"32": [{"row_kv_per_agent_bytes": 1.0}]}}}
    assert tables.compression_rows({"storage": old}) == []  # a JSON from before the measure adds no row


@pytest.mark.parametrize("name", ["concurrency", "fidelity", "prefill", "storage"])
def test_tag_names_the_results_files(name, tmp_path, monkeypatch):
    """``--tag T`` keeps a run at other settings beside the default one: NAME_T[_quick].json, the plot alike."""
    bench = _PATH.parent
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(f"td_bench_{name}", bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    common = mod.C
    assert common.out_name(name, mod.parse_args(["--quick"])) == name
    args = mod.parse_args(["--quick", "--tag", "sink2"])
    assert common.out_name(name, args) == f"{name}_sink2"
    assert common.write_json(common.out_name(name, args), args.quick, {}, tmp_path).name == f"{name}_sink2_quick.json"


def test_every_limit_sentence_is_computed_from_the_json(tables):
    """The 'what limits the ratio' sentences: the row bound from the agent's own share, the pool against the
    round latency for the concurrency sweep."""
    # dense row 100, dense shared 80 (own 20), N = 16: at most 100 / (20 + 80 / 16) = 4.0x with no diffs
    rec = {"row_kv_per_agent_bytes": 25.0, "dense_over_row": 4.0, "shared_kv_per_agent_bytes": 8.0,
           "dense_over_shared": 10.0}
    assert "own 20% of the row" in tables.row_limit(rec, 16) and "could not pass 4.0x" in tables.row_limit(rec, 16)
    assert "at most 16x" in tables.shared_limit(rec, 16) and "to 10.0x" in tables.shared_limit(rec, 16)

    def sweep(used: int) -> dict:
        runs = [{"n_agents": 4, "meets_slo": True}, {"n_agents": 6, "meets_slo": False, "peak_used_slots": used,
                                                      "uncached_tokens": [900, 300, 350],
                                                      "measured_round_latency_max_s": 41.0}]
        return {"settings": {"pool_tokens": 1000}, "results": {"tokendance": {"sweep": runs}}}

    assert tables.concurrency_limit(sweep(990)).startswith("the KV pool: at N = 6")
    latency = tables.concurrency_limit(sweep(310))
    assert latency.startswith("round latency, not KV: at N = 6") and "31% of the pool" in latency and "350" in latency
    assert "41.0 s" in latency
