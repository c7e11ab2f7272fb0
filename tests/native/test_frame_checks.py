"""Every receiver check, hit on purpose by a frame that is authentic (correctly
sealed with the receiver's key) except for the one thing being checked.

Each case names the check's own message, so removing a check makes its case
fail even when a later check would still reject the frame under another name.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import novacron.native as N
import novacron.native.stream as S

KEY = bytes(range(32))
PAGE = N.PAGE_SIZE
NPAGES = 8
STREAM = b"\x01\x02\x03\x04"


def seal(plain: bytes, *, kind: int = S.KIND_PAGES, flags: int = 0, reserved: int = 0,
         raw_len: int | None = None, version: int = S.VERSION, magic: bytes = S.MAGIC,
         body: bytes | None = None) -> bytes:
    """Frame 0 of a stream, sealed exactly as a sender would but with any field set."""
    body = plain if body is None else body
    header = S.HEADER.pack(magic, version, kind, flags, reserved, S.key_id(KEY), STREAM, 0,
                           len(body) + S.TAG_SIZE, len(plain) if raw_len is None else raw_len, 0)
    return header + AESGCM(KEY).encrypt(STREAM + bytes(8), body, header)


def payload(records: list[tuple[int, int, int]], refs: list[tuple[int, bytes]] | None = None,
            data_pages: int = 0, *, total: int | None = None, extra: bytes = b"") -> bytes:
    """A page-frame plaintext: header, (first, count, kind) records, refs, data pages."""
    refs = refs or []
    n_all = sum(c for _f, c, _k in records) if total is None else total
    out = struct.pack("<IIII", len(records), len(refs), data_pages, n_all)
    for first, count, kind in records:
        out += struct.pack("<QIB3x", first, count, kind)
    for src, digest in refs:
        out += struct.pack("<Q", src) + digest
    return out + os.urandom(data_pages * PAGE) + extra


GOOD = payload([(1, 1, 0)], data_pages=1)

CASES: dict[str, tuple[Callable[[], bytes], type[N.FrameError], str]] = {
    "bad magic": (lambda: seal(GOOD, magic=b"XXXX"), N.FrameMalformed, "bad magic"),
    "future version": (lambda: seal(GOOD, version=2), N.FrameMalformed, "version 2"),
    "body shorter than a tag": (
        lambda: seal(GOOD)[:28] + struct.pack("<I", 3) + seal(GOOD)[32:],
        N.FrameMalformed, "out of bounds"),
    "body over the limit": (
        lambda: seal(GOOD)[:28] + struct.pack("<I", S.MAX_BODY + S.TAG_SIZE + 1) + seal(GOOD)[32:],
        N.FrameMalformed, "out of bounds"),
    "other key id": (lambda: seal(GOOD)[:8] + bytes(8) + seal(GOOD)[16:], N.FrameWrongKey,
                     "different key"),
    "unknown kind": (lambda: seal(GOOD, kind=7), N.FrameMalformed, "unknown frame kind"),
    "unknown flag": (lambda: seal(GOOD, flags=4), N.FrameMalformed, "unknown frame kind"),
    "reserved byte set": (lambda: seal(GOOD, reserved=1), N.FrameMalformed,
                          "unknown frame kind"),
    "raw length over the limit": (lambda: seal(GOOD, raw_len=S.MAX_RAW + 1), N.FrameMalformed,
                                  "exceeds"),
    "zstd flag on garbage": (lambda: seal(GOOD, flags=S.FLAG_ZSTD, body=b"not zstd" * 8),
                             N.FrameMalformed, "does not decompress"),
    "zstd body longer than announced": (
        lambda: seal(GOOD, flags=S.FLAG_ZSTD, raw_len=len(GOOD) - 1,
                     body=zstandard.ZstdCompressor().compress(GOOD)),
        N.FrameMalformed, "header says"),
    "stored body of another length": (lambda: seal(GOOD, raw_len=len(GOOD) + 1),
                                      N.FrameMalformed, "header says"),
    "payload shorter than its header": (lambda: seal(b"\x01" * 12), N.FrameMalformed,
                                        "shorter than its header"),
    "payload with a stray byte": (lambda: seal(payload([(1, 1, 0)], data_pages=1, extra=b"x")),
                                  N.FrameMalformed, "does not match its counts"),
    "record of unknown kind": (lambda: seal(payload([(1, 1, 9)])), N.FrameMalformed,
                               "record 0 is malformed"),
    "empty record": (lambda: seal(payload([(1, 0, 1)])), N.FrameMalformed,
                     "record 0 is malformed"),
    "record past memory": (lambda: seal(payload([(NPAGES - 1, 2, 1)])), N.FrameMalformed,
                           "past memory"),
    "counts that do not add up": (lambda: seal(payload([(1, 2, 1)], total=3)),
                                  N.FrameMalformed, "do not add up"),
    "reference past memory": (lambda: seal(payload([(1, 1, 2)], [(NPAGES, bytes(32))])),
                              N.FrameMalformed, "reference 0 points past memory"),
    "reference with a wrong digest": (lambda: seal(payload([(1, 1, 2)], [(0, bytes(32))])),
                                      N.DedupMiss, "digest"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_check_rejects_with_its_own_error_and_writes_nothing(case: str) -> None:
    make, error, message = CASES[case]
    dst = np.zeros(NPAGES * PAGE, dtype=np.uint8)
    dst[:PAGE] = 7  # page 0 is the source of references
    before = dst.copy()
    receiver = N.PageStreamReceiver(KEY, dst)
    with pytest.raises(error, match=message):
        receiver.open(make())
    assert np.array_equal(dst, before)
    assert receiver.next_seq == 0
    # the very same stream position still accepts a good frame
    assert receiver.open(seal(GOOD)).pages == 1
    assert not np.array_equal(dst, before)


def test_decompression_errors_surface_from_the_worker_threads() -> None:
    dst = np.zeros(NPAGES * PAGE, dtype=np.uint8)
    receiver = N.PageStreamReceiver(KEY, dst)
    with pytest.raises(N.FrameMalformed, match="does not decompress"):
        receiver.open_many([seal(GOOD, flags=S.FLAG_ZSTD, body=b"not zstd" * 8)], threads=2)
    assert not dst.any() and receiver.next_seq == 0


def test_the_crafted_good_frame_is_what_a_sender_would_accept() -> None:
    """Guards the helpers above: without this, a broken ``seal`` would make every
    case pass for the wrong reason (e.g. all as tampering)."""
    dst = np.zeros(NPAGES * PAGE, dtype=np.uint8)
    opened = N.PageStreamReceiver(KEY, dst).open(seal(GOOD))
    assert opened.pages == 1 and opened.seq == 0
    assert bytes(dst[PAGE:2 * PAGE]) == GOOD[-PAGE:]


@pytest.mark.parametrize("extra_pages", [0, 1])
def test_references_cannot_expand_a_frame_past_the_plaintext_limit(extra_pages: int) -> None:
    """A 40-byte reference stands for a 4 KiB page: a frame of well under MAX_RAW
    bytes of references must not make the receiver resolve more than MAX_RAW
    bytes of pages (scratch memory, digest work), the limit data frames have."""
    limit = S.MAX_RAW // PAGE
    n = limit + extra_pages
    dst = np.zeros((n + 1) * PAGE, dtype=np.uint8)
    dst[:PAGE] = 7  # page 0: the source every reference names, with its true digest
    digest = N.page_digest(bytes(dst[:PAGE]))
    frame = seal(payload([(1, n, 2)], [(0, digest)] * n))
    assert len(frame) < S.MAX_RAW // 50  # small on the wire
    receiver = N.PageStreamReceiver(KEY, dst)
    if extra_pages:
        with pytest.raises(N.FrameMalformed, match="expand past"):
            receiver.open(frame)
        assert not dst[PAGE:].any() and receiver.next_seq == 0
    else:  # at the limit: what a data frame may carry, so accepted
        assert receiver.open(frame).pages == n
        assert (dst[PAGE:] == 7).all()
