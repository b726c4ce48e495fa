"""The benchmark's own logic: target verdicts, and that its plaintext matches its data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agents.bench import SPECS, _check_all, beside, judge, write_data
from agents.config import load_party
from agents.data import load_table
from agents.init import init_consortium
from protocol.tokens import tokenize


def test_judge_reports_how_far_a_target_is_missed() -> None:
    t = judge({"large_round": {"ratio_to_transport_floor": 3.0, "expansion": 1.05},
               "small_rounds": {"rounds_per_s": 50.0, "p99_ms": 20.0}})
    assert t["large_round.ratio_to_transport_floor"]["met"] is False
    assert t["large_round.ratio_to_transport_floor"]["missed_by_factor"] == 2.0
    assert t["large_round.expansion"]["met"] is True
    assert t["small_rounds.rounds_per_s"]["missed_by_factor"] == 2.0
    assert t["small_rounds.p99_ms"]["met"] is True
    assert "paillier.speedup" not in t


def test_written_data_and_its_plaintext_agree(tmp_path: Path) -> None:
    init_consortium(tmp_path, institutions=3, customers=1, bootstrap="127.0.0.1:1",
                    attributes=SPECS)
    expected = write_data(tmp_path, 3, 500, SPECS, hold=0.7, seed=1)
    ids = [f"CUST-{i:08d}" for i in range(500)]
    total = np.zeros((500, 1 + len(SPECS)), dtype=np.int64)
    for i in (1, 2, 3):
        cfg = load_party(tmp_path / f"bank-{i}.toml")
        assert cfg.data is not None
        assert cfg.data.suffix == ".parquet"
        assert cfg.consortium_key is not None
        table = load_table(cfg.data, cfg.consortium.attributes, cfg.consortium_key)
        total += table.aligned(tokenize(ids, cfg.consortium_key),
                               tuple(s.name for s in SPECS)).view(np.int64)
    np.testing.assert_array_equal(total, expected)
    rows = [[c, str(t[0]), *(s.format(int(v)) for s, v in zip(SPECS, t[1:], strict=True))]
            for c, t in zip(ids, expected, strict=True) if t[0] >= 1]  # as published
    assert _check_all(rows, expected, SPECS)
    assert not _check_all(rows[:-1], expected, SPECS)  # a held row missing
    rows[7][2] = "0.01" if rows[7][2] != "0.01" else "0.02"
    assert not _check_all(rows, expected, SPECS)


def test_cluster_figures_go_beside_the_single_brokers() -> None:
    single = {"large_round": {"seconds": 2.0, "transport_floor_s": 1.0},
              "small_rounds": {"rounds_per_s": 50.0, "p50_ms": 100.0, "p99_ms": 200.0}}
    cluster = {"large_round": {"seconds": 3.0, "transport_floor_s": 1.5},
               "small_rounds": {"rounds_per_s": 25.0, "p50_ms": 200.0, "p99_ms": 500.0}}
    said: list[str] = []
    out = beside(single, cluster, "cluster", said.append)
    assert out["large_round.seconds"] == {"single": 2.0, "cluster": 3.0,
                                          "cluster_to_single": 1.5}
    assert out["small_rounds.rounds_per_s"]["cluster_to_single"] == 0.5
    assert out["small_rounds.p99_ms"]["cluster_to_single"] == 2.5
    assert len(said) == 5
