"""The per-batch compression choice follows the measured link and CPU rates."""

from __future__ import annotations

from novacron.agent.migration.pipeline import RESAMPLE, CompressionPolicy
from novacron.native import EncodeStats

MB = 1_000_000


def batch(policy: CompressionPolicy, *, encode_mb_s: float, zstd_mb_s: float, ratio: float,
          link_mb_s: float, plain: int = 4 * MB) -> bool:
    """Feed one batch encoded the way the policy asked; returns whether it compressed."""
    compress = policy.compress_next()
    zstd_thread_s = plain / (zstd_mb_s * MB) * policy.threads if compress else 0.0
    wall = plain / (encode_mb_s * MB) + zstd_thread_s / policy.threads
    body = int(plain * ratio) if compress else plain
    enc = EncodeStats(plain_bytes=plain, body_bytes=body, compressed_plain=plain if compress else 0,
                      compress_s=zstd_thread_s, wall_s=wall, compressed=compress)
    policy.observe(enc, body / (link_mb_s * MB), body)
    return compress


def test_fast_link_sends_stored_and_resamples() -> None:
    p = CompressionPolicy(threads=2)
    choices = [batch(p, encode_mb_s=2000, zstd_mb_s=600, ratio=0.4, link_mb_s=3000) for _ in range(40)]
    assert choices[0]  # the first batch learns what zstd costs and gains
    # afterwards stored, but one compressed sample every RESAMPLE batches
    assert sum(choices[1:]) == len(choices[1:]) // RESAMPLE
    assert p.as_dict()["link_mb_s"] and p.as_dict()["zstd_mb_s"]


def test_slow_link_compresses_when_it_shrinks_the_data() -> None:
    p = CompressionPolicy(threads=2)
    choices = [batch(p, encode_mb_s=2000, zstd_mb_s=600, ratio=0.4, link_mb_s=50) for _ in range(20)]
    assert all(choices)
    # ... but not data zstd cannot shrink: then it only costs CPU
    p = CompressionPolicy(threads=2)
    choices = [batch(p, encode_mb_s=2000, zstd_mb_s=600, ratio=0.99, link_mb_s=50) for _ in range(20)]
    assert sum(choices) <= 1 + 20 // RESAMPLE


def test_policy_follows_a_link_that_slows_down() -> None:
    p = CompressionPolicy(threads=2)
    fast = [batch(p, encode_mb_s=2000, zstd_mb_s=600, ratio=0.4, link_mb_s=3000) for _ in range(10)]
    slow = [batch(p, encode_mb_s=2000, zstd_mb_s=600, ratio=0.4, link_mb_s=40) for _ in range(30)]
    assert not any(fast[1:RESAMPLE])
    assert all(slow[-10:])


def test_disabled_policy_always_compresses() -> None:
    p = CompressionPolicy(threads=2, enabled=False)
    assert all(batch(p, encode_mb_s=2000, zstd_mb_s=600, ratio=0.4, link_mb_s=3000) for _ in range(5))
