"""The agent's Prometheus metrics: names, units, labels, and the HTTP endpoint."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agents.metrics import AgentMetrics


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_a_round_moves_the_counters_and_histograms_seen_over_http() -> None:
    clock = FakeClock()
    m = AgentMetrics("bank-1", "institution", "0.1.0", clock)
    port = m.serve(0)
    try:
        before = scrape(port)
        assert before["zerosum_rounds_in_flight{}"] == 0
        assert before["zerosum_agent_info{party=bank-1,role=institution,version=0.1.0}"] == 1
        m.snapshot(1234)
        m.round_opened(b"r" * 16)
        m.received.inc()
        m.received_bytes.inc(700)
        clock.t += 0.04
        m.stage(b"r" * 16, "contribution")
        clock.t += 0.2
        m.round_ended(b"r" * 16, "result")
        m.round_opened(b"s" * 16)
        m.round_ended(b"s" * 16, "aborted", "TIMEOUT")
        m.rejected.labels("BadSignature").inc()
        clock.t += 30
        after = scrape(port)
    finally:
        m.close()
    assert after["zerosum_rounds_total{outcome=result,reason=}"] == 1
    assert after["zerosum_rounds_total{outcome=aborted,reason=TIMEOUT}"] == 1
    assert after["zerosum_round_duration_seconds_count{outcome=result}"] == 1
    assert abs(after["zerosum_round_duration_seconds_sum{outcome=result}"] - 0.24) < 1e-9
    assert after["zerosum_stage_duration_seconds_bucket{le=0.05,stage=contribution}"] == 1
    assert after["zerosum_stage_duration_seconds_bucket{le=0.025,stage=contribution}"] == 0
    assert after["zerosum_messages_received_total{}"] == 1
    assert after["zerosum_received_bytes_total{}"] == 700
    assert after["zerosum_messages_rejected_total{reason=BadSignature}"] == 1
    assert after["zerosum_data_snapshot_rows{}"] == 1234
    assert abs(after["zerosum_data_snapshot_age_seconds{}"] - 30.24) < 1e-6
    assert after["zerosum_rounds_in_flight{}"] == 0


def test_two_agents_in_one_process_keep_their_own_figures() -> None:
    a = AgentMetrics("bank-1", "institution", "0.1.0", FakeClock())
    b = AgentMetrics("bank-2", "institution", "0.1.0", FakeClock())
    a.sent.inc(3)
    b.sent.inc(5)
    assert a.registry.get_sample_value("zerosum_messages_sent_total") == 3
    assert b.registry.get_sample_value("zerosum_messages_sent_total") == 5
