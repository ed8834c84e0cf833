"""Seeded fuzz of the CIF and CSV readers (mutations and counts in ``fuzz_inputs.py``): every input reported,
no crash, no rejection without a reason, no good file lost, no broken file silently accepted, memory bounded."""
from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("kflow_fuzz_inputs", Path(__file__).parent / "fuzz_inputs.py")
F = importlib.util.module_from_spec(spec)
spec.loader.exec_module(F)


def _check(counts: dict, items: list[dict]) -> None:
    bad = [(it["id"], it["row"]) for it in items if it["row"] is None or it["row"].get("reason") == "error"]
    assert counts["crashed"] == 0, bad
    assert counts["handled"] == counts["tried"] == len(items)
    assert counts["no_reason"] == 0
    assert counts["lost"] == 0, [it["id"] for it in items if it["expect"] == "accept"
                                 and it["row"]["status"] != "accepted"]
    assert counts["wrong_accept"] == 0, [it["id"] for it in items if it["expect"] == "reject"
                                         and it["row"]["status"] == "accepted"]
    assert counts["misdiagnosed"] == 0


def test_fuzzed_cifs(tmp_path):
    # each file in a worker capped at 1 GB: a mutation that escaped the caps would be reported as `memory`
    counts, items = F.fuzz_cifs(tmp_path, seed=0, n=len(F.CIF_MUTATIONS) + 5, workers=2, max_memory_gb=1.0)
    _check(counts, items)
    assert not [it for it in items if it["row"]["reason"] in ("memory", "timeout")]
    assert {it["mutation"] for it in items} == set(F.CIF_MUTATIONS)  # every mutation tried


def test_fuzzed_csvs(tmp_path):
    counts, items = F.fuzz_csvs(tmp_path, seed=0, n=len(F.CSV_MUTATIONS) + 5)
    _check(counts, items)
    assert {it["mutation"] for it in items} == set(F.CSV_MUTATIONS)
