"""The accounting's arithmetic (estimate.py) and the ``ack`` message's checks."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from novacron.agent.channel.records import ProtocolError
from novacron.agent.migration import estimate, protocol
from novacron.agent.migration.source import PAGE_RECORD_BYTES, _sampled_page_bytes
from novacron.native import bitmap_from_indices


def test_link_rate_comes_from_busy_runs_timed_by_the_destination() -> None:
    meter = estimate.LinkMeter()
    written = 10 << 20  # all of it queued up front: the link is busy throughout
    # the destination reads 256 KiB every 0.1 s (2.6 MB/s) ...
    their = [(0.1 * i, 256 * 1024 * i) for i in range(1, 21)]
    # ... but its acks reach us bunched: two at a time, a hair apart
    for i, (t, acked) in enumerate(their):
        meter.ack(now=100 + 0.2 * (i // 2) + 1e-4 * (i % 2), acked=acked, written=written, their_t=t)
    assert meter.samples >= 4
    assert meter.busy_rate == pytest.approx(256 * 1024 / 0.1, rel=0.01)


def test_an_idle_or_capped_sender_does_not_measure_the_link() -> None:
    meter = estimate.LinkMeter()
    written = 0
    for i in range(1, 30):  # each ack covers bytes written only after the previous one
        written += 128 * 1024
        meter.ack(now=0.1 * i, acked=written, written=written, their_t=0.1 * i)
    assert meter.samples == 0 and meter.busy_rate == 0.0
    assert meter.current_rate(2.9) == pytest.approx(128 * 1024 / 0.1, rel=0.05)
    assert meter.current_rate(10.0) == 0.0  # nothing acked for longer than the window


def test_switchover_estimate_adds_every_part() -> None:
    est = estimate.switchover(dirty_pages=1000, bytes_per_page=2048, queued_bytes=1_000_000,
                              device_bytes=300_000, link_bytes_s=10e6, final_bytes_s=10e6,
                              scan_s=0.01, rtt_s=0.002, handover_s=0.03)
    assert est.total == pytest.approx(0.01 + 0.1 + 0.2048 + 0.03 + 0.004 + 0.03)
    assert set(est.parts_ms()) == {"final_scan_ms", "queued_ms", "final_pages_ms", "device_state_ms",
                                   "handover_ms", "queued_others_ms"}
    # a shared link: the other migrations' unacked bytes count, as a part of their own
    shared = estimate.switchover(dirty_pages=1000, bytes_per_page=2048, queued_bytes=1_000_000,
                                 device_bytes=300_000, link_bytes_s=10e6, final_bytes_s=10e6,
                                 scan_s=0.01, rtt_s=0.002, handover_s=0.03, queued_others_bytes=2_000_000)
    assert shared.queued_others == pytest.approx(0.2) and shared.total == pytest.approx(est.total + 0.2)
    # pages held to a cap while paused take longer
    capped = estimate.switchover(dirty_pages=1000, bytes_per_page=2048, queued_bytes=0,
                                 device_bytes=0, link_bytes_s=10e6, final_bytes_s=1e6,
                                 scan_s=0, rtt_s=0)
    assert capped.final_pages == pytest.approx(2.048)


@pytest.mark.parametrize(("msg", "words"), [
    ({"op": "ack", "bytes": 11}, "bytes out of range"),  # more than was written
    ({"op": "ack", "bytes": -1}, "bytes out of range"),
    ({"op": "ack"}, "'bytes' missing"),
    ({"op": "ack", "bytes": 5, "round": 0}, "round out of range"),
    ({"op": "ack", "bytes": 5, "t": "now"}, "t must be"),
    ({"op": "ack", "bytes": 5, "t": True}, "t must be"),
])
def test_bad_acks_are_protocol_errors(msg: dict, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        protocol.check_ack(msg, written=10)
    assert protocol.check_ack({"op": "ack", "bytes": 10, "round": 3, "t": 1.5}, 10) == (10, 3, 1.5)


def test_unheld_runs_measure_the_link_under_a_cap() -> None:
    """A capped sender's acks measure the cap; its runs that left without waiting
    on the cap, timed to the ack covering them, measure the link (a lower bound)."""
    meter = estimate.LinkMeter()
    cap = 5e6
    written, now = 0, 0.0
    for _ in range(20):  # 1 MiB frames, one per cap interval, each on a 100 MB/s link
        run_start = written
        meter.unheld_run(now, run_start, run_start + (1 << 20))
        written += 1 << 20
        meter.ack(now=now + (1 << 20) / 100e6 + 0.001, acked=written, written=written,
                  their_t=now + (1 << 20) / 100e6)
        now += (1 << 20) / cap
    assert meter.busy_rate == 0.0  # the capped sender never kept the link busy
    assert 80e6 < meter.uncapped_rate <= 100e6  # the link, less the ack's way back
    # a run too small to time is ignored; one whose ack has not come stays pending
    meter2 = estimate.LinkMeter()
    meter2.unheld_run(0.0, 0, 1000)
    meter2.ack(now=0.001, acked=1000, written=1000)
    assert meter2.uncapped_rate == 0.0
    meter2.unheld_run(1.0, 1000, 1000 + (1 << 20))
    meter2.ack(now=1.01, acked=1000 + (1 << 19), written=1000 + (1 << 20))
    assert meter2.uncapped_rate == 0.0
    meter2.ack(now=1.02, acked=1000 + (1 << 20), written=1000 + (1 << 20))
    assert meter2.uncapped_rate == pytest.approx((1 << 20) / 0.02)


def test_final_pages_are_estimated_at_the_uncapped_rate_unless_the_cap_holds_them() -> None:
    """The flaw fixed: a busy guest under a 5 MB/s cap on a 100 MB/s link. Its final
    pages go uncapped, so its pause fits a 300 ms budget; estimated at the cap's
    rate, it would not (and the migration would abort as 'did not converge')."""
    cap, link_acked, uncapped = 5e6, 5e6, 90e6  # acks measured the cap only
    dirty = 2000  # 8 MiB dirty at the pause

    def pause(final: float) -> float:
        return estimate.switchover(dirty_pages=dirty, bytes_per_page=4096, queued_bytes=0,
                                   device_bytes=300_000, link_bytes_s=link_acked,
                                   final_bytes_s=final, scan_s=0.01, rtt_s=0.001).total

    final = estimate.final_rate(link_bytes_s=link_acked, uncapped_bytes_s=uncapped, cap_bytes_s=cap,
                                throttle_final=False)
    assert final == uncapped and pause(final) < 0.3
    assert pause(link_acked) > 1.0  # the old estimate: > 1 s, aborted
    # the operator asked the cap to hold while paused: the cap it is
    assert estimate.final_rate(link_bytes_s=link_acked, uncapped_bytes_s=uncapped, cap_bytes_s=cap,
                               throttle_final=True) == cap
    # nothing measured unheld (no cap): the acked link rate, as before
    assert estimate.final_rate(link_bytes_s=80e6, uncapped_bytes_s=0.0, cap_bytes_s=0.0,
                               throttle_final=False) == 80e6


def test_a_run_told_after_its_ack_is_timed_by_that_ack() -> None:
    """The sender tells a run when the cap first holds it; the ack covering it may be
    in already (the sender was encoding): the recent acks time it all the same."""
    meter = estimate.LinkMeter()
    meter.ack(now=1.01, acked=1 << 20, written=1 << 20)
    meter.unheld_run(1.0, 0, 1 << 20)
    assert meter.uncapped_rate == pytest.approx((1 << 20) / 0.01)


def test_a_run_is_timed_by_the_destination_between_acks_inside_it() -> None:
    """Acks inside a run, stamped by the destination, time the link without the round
    trip or the delay of the covering ack."""
    meter = estimate.LinkMeter()
    meter.unheld_run(0.0, 0, 1 << 20)
    for i in range(1, 5):  # 256 KiB every 10 ms of their time (26 MB/s) ...
        meter.ack(now=0.2 + 0.01 * i, acked=i << 18, written=1 << 20, their_t=50.0 + 0.01 * i)
    # ... while our clock saw the last one 0.24 s after the first write (a late loop)
    assert meter.uncapped_rate == pytest.approx((3 << 18) / 0.03)


def test_final_pages_go_no_faster_than_the_encoder() -> None:
    """Unheld runs time frames already encoded: a 373 MB/s link with a 190 MB/s
    encoder sends the final pages at 190 (measured: a 256 MiB guest dirtying
    128 MB/s under a 50 MB/s cap was estimated at 202 ms and paused 305 ms)."""
    assert estimate.final_rate(link_bytes_s=50e6, uncapped_bytes_s=373e6, cap_bytes_s=50e6,
                               throttle_final=False, encode_bytes_s=190e6) == 190e6
    assert estimate.final_rate(link_bytes_s=50e6, uncapped_bytes_s=373e6, cap_bytes_s=50e6,
                               throttle_final=False) == 373e6  # encoder not measured yet


def test_the_policy_reports_the_encoder_rate_of_its_choice() -> None:
    from novacron.agent.migration.pipeline import CompressionPolicy
    from novacron.native import EncodeStats

    p = CompressionPolicy()
    assert p.encode_wire_rate() == 0.0
    assert p.pack_next() is False  # stored first
    p.observe(EncodeStats(raw_bytes=4_000_000, plain_bytes=4_000_000, body_bytes=4_000_000, wall_s=0.02,
                          compressed=False, deduped=False), 0.001, 4_000_000)
    assert p.encode_wire_rate() == pytest.approx(200e6)


def test_the_dirty_set_is_weighed_by_a_sample_of_its_own_pages() -> None:
    """A guest whose memory packs well but whose working set does not: the pages
    the pause will send are priced at their own weight, not the memory's average."""
    pages = 1024
    mm = mmap.mmap(-1, pages * protocol.PAGE)
    rng = np.random.default_rng(1)
    mem = np.frombuffer(mm, dtype=np.uint8).reshape(pages, protocol.PAGE)
    mem[:512] = rng.integers(0, 256, size=(512, protocol.PAGE), dtype=np.uint8)  # random
    mem[512:768] = np.arange(protocol.PAGE, dtype=np.uint8) % 7  # compressible; the rest zero
    hot = bitmap_from_indices(np.arange(0, 512, 3, dtype=np.uint32), pages)
    text = bitmap_from_indices(np.arange(512, 768, dtype=np.uint32), pages)
    zero = bitmap_from_indices(np.arange(768, 1024, dtype=np.uint32), pages)
    assert _sampled_page_bytes(mm, hot, True, 3) > protocol.PAGE  # random: zstd cannot shrink it
    assert _sampled_page_bytes(mm, text, True, 3) < 0.1 * protocol.PAGE
    assert _sampled_page_bytes(mm, zero, True, 3) < 0.1 * protocol.PAGE
    assert _sampled_page_bytes(mm, text, False, 3) == protocol.PAGE + PAGE_RECORD_BYTES  # stored
    assert _sampled_page_bytes(mm, bitmap_from_indices(np.array([], dtype=np.uint32), pages),
                               True, 3) is None
    del mem
    mm.close()


def test_a_pause_that_fits_is_still_shortened_while_rounds_shrink_it() -> None:
    def est(pages_s: float) -> estimate.Estimate:
        return estimate.Estimate(final_scan=0.002, queued=0.0, final_pages=pages_s, device_state=0.001,
                                 handover=0.02)

    def worth(pages_s: float, sent: int, dirty: int, polished: int = 0, round_s: float = 0.6) -> bool:
        return estimate.worth_another_round(est(pages_s), sent_pages=sent, dirty_pages=dirty,
                                            polished=polished, round_s=round_s)

    # 50 ms of pages left, and the round shrank the dirty set to a fifth: another round
    assert worth(0.05, 40_000, 8_000)
    # the pages part is below what anyone notices: stop
    assert not worth(0.002, 40_000, 8_000)
    # the guest dirties about as fast as we send: another round costs time and bytes for nothing
    assert not worth(0.05, 14_000, 11_000)
    # bounded: at most POLISH_ROUNDS past the first fit, each short (a low cap: the budget rules)
    assert not worth(0.05, 40_000, 8_000, polished=estimate.POLISH_ROUNDS)
    assert not worth(0.05, 40_000, 8_000, round_s=estimate.POLISH_ROUND_S + 1)
    assert not worth(0.05, 0, 0)
