"""Logging cannot flood the journal or stall the event loop."""

from __future__ import annotations

import logging

from conftest import FORM, wattmon_form

from ingestd.runtime.logs import Throttle


def test_throttle_lets_a_burst_through_then_counts_what_it_held_back():
    throttle = Throttle(per_sec=0.0001, burst=3)
    assert [throttle.allow("bad_md5")[0] for _ in range(5)] == [True, True, True, False, False]
    assert throttle.allow("other") == (True, 0)  # per kind


async def test_a_flood_of_refusals_logs_a_few_lines_and_counts_them_all(client, caplog):
    caplog.set_level(logging.INFO, logger="ingestd.http")
    for n in range(60):
        resp = await client.post(
            "/wattmon",
            data=wattmon_form(f"0000000001{n:02x}", "T,V\nt,1\n", md5="0" * 32),
            headers=FORM,
        )
        assert resp.status == 400
    rejected = [r for r in caplog.records if r.getMessage().startswith("rejected")]
    assert 1 <= len(rejected) <= 25
    assert "device=0000000001" in rejected[0].getMessage()
    text = await (await client.get("/metrics")).text()
    assert 'ingestd_requests_total{outcome="bad_md5",protocol="wattmon"} 60.0' in text
