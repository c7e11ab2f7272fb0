"""Disk clusters named by digest (diskdedup.py): the destination's index of a real image,
the source's write frames, and the destination's rebuilt writes, repairs included."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.agent.channel.records import ProtocolError
from novacron.agent.migration import diskdedup as dd
from novacron.agent.migration import nbdwire as nw
from novacron.agent.migration.nbdwire import NbdTracker
from novacron.agent.vm.expanded import Expanded
from tests.disks.test_nbdwire import greeting, opt_reply, option

C = dd.CLUSTER


def write_req(handle: int, offset: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQQI", nw.REQUEST_MAGIC, 0, nw.CMD_WRITE, handle, offset, len(payload)) + payload


def capturing() -> NbdTracker:
    """A capturing tracker past the handshake."""
    t = NbdTracker(capture=True)
    t.server_bytes(greeting())
    client = struct.pack(">I", 3) + option(nw.OPT_GO, b"\0\0\0\x05disk0\0\0")
    t.client_bytes(client)
    t.server_bytes(opt_reply(nw.OPT_GO, nw.REP_ACK))
    assert t.transmission
    assert t.take() == [client]  # the handshake passes as it is
    return t


def image(tmp: Path, clusters: list[bytes | None]) -> Path:
    """A raw image of these clusters (None: zeroes, a hole)."""
    p = tmp / "tpl.raw"
    with p.open("wb") as f:
        f.truncate(len(clusters) * C)
        for i, c in enumerate(clusters):
            if c is not None:
                f.seek(i * C)
                f.write(c)
    return p


def index_of(path: Path, fmt: str = "raw") -> tuple[int, dd.ClusterIndex]:
    fd = os.open(path, os.O_RDONLY)
    return fd, asyncio.run(dd.index_image(fd, fmt))


def decode_all(dec: dd.FrameDecoder, frames: bytes, kept: dict[int, bytes], step: int = 100_000) -> bytes:
    """Feed ``frames`` in pieces; answer every need from ``kept`` (the source's copies)."""
    out = bytearray()
    for i in range(0, len(frames), step):
        got, need = dec.feed(frames[i:i + step])
        out += b"".join(got)
        while need:
            handle = dec.pending_handle
            assert handle is not None
            for p in need:
                rec = dd.repair_record(0, handle, p, kept[handle][p:p + C])
                _, h, pos, data = dd.parse_repair(rec)
                got, more = dec.fill(h, pos, data)
                out += b"".join(got)
            need = more
    assert dec.idle
    return bytes(out)


def encode(items: list[bytes | tuple[bytes, bytes]], keys: np.ndarray, kept: dict[int, bytes]) -> bytes:
    frames = bytearray()
    for item in items:
        if isinstance(item, tuple):
            enc = dd.encode_write(item[0], item[1], keys)
            if enc.refs:
                kept[int.from_bytes(item[0][8:16], "big")] = item[1]
            frames += enc.frame
        else:
            frames += dd.encode_raw(item)
    return bytes(frames)


def test_capture_keeps_every_byte_in_order_whatever_the_chunking() -> None:
    t = capturing()
    stream = write_req(1, 0, b"a" * 5000) + struct.pack(">IHHQQI", nw.REQUEST_MAGIC, 0, nw.CMD_FLUSH, 2, 0, 0) \
        + write_req(3, C, os.urandom(3 * C)) + write_req(4, 0, b"")
    items: list[bytes | tuple[bytes, bytes]] = []
    for i in range(0, len(stream), 777):
        t.client_bytes(stream[i:i + 777])
        items += t.take()
    flat = b"".join(x if isinstance(x, bytes) else x[0] + x[1] for x in items)
    assert flat == stream
    writes = [x for x in items if isinstance(x, tuple)]
    assert [len(w[1]) for w in writes] == [5000, 3 * C]  # the empty write passes as bytes


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_index_names_every_nonzero_cluster_where_the_image_holds_it(tmp_path: Path, fmt: str) -> None:
    data = [os.urandom(C) if i % 3 else None for i in range(40)]
    data[7] = data[8]  # the same content twice: one key
    raw = image(tmp_path, data)
    path = raw
    if fmt == "qcow2":
        path = tmp_path / "tpl.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    fd, idx = index_of(path, fmt)
    try:
        distinct = {c for c in data if c is not None}
        assert len(idx.keys) == len(distinct) and not idx.truncated
        assert idx.index_bytes == 16 * len(distinct)
        for c in distinct:
            off = idx.offset_of(blake3.blake3(c).digest())
            assert off is not None and os.pread(fd, C, off) == c
        assert idx.offset_of(blake3.blake3(bytes(C)).digest()) is None
        assert idx.offset_of(blake3.blake3(os.urandom(C)).digest()) is None
    finally:
        os.close(fd)


def test_a_partial_index_is_not_kept_for_the_next_migration(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = image(tmp_path, [os.urandom(C) for _ in range(8)])
    real, calls = dd._hash_extents, []

    def first_out_of_time(fd: int, extents: list[dict[str, object]], budget_s: float,
                          stop: object) -> dd.ClusterIndex:
        calls.append(budget_s)
        return real(fd, extents, 0.0 if len(calls) == 1 else budget_s, stop)  # type: ignore[arg-type]

    monkeypatch.setattr(dd, "_hash_extents", first_out_of_time)
    fd = os.open(path, os.O_RDONLY)
    try:
        part = asyncio.run(dd.index_image(fd, "raw"))
        assert part.truncated
        whole = asyncio.run(dd.index_image(fd, "raw"))
        assert not whole.truncated and len(whole.keys) == 8
        assert asyncio.run(dd.index_image(fd, "raw")) is whole  # this one is kept
    finally:
        os.close(fd)


def test_writes_are_rebuilt_with_the_named_clusters(tmp_path: Path) -> None:
    tpl = [os.urandom(C) for _ in range(16)]
    fd, idx = index_of(image(tmp_path, tpl))
    t = capturing()
    fresh = os.urandom(C)
    # aligned (4 named, one new); 100 bytes before a 64 KiB boundary (tpl[5] lies whole on
    # it and is named; tpl[6] straddles the next one and is sent); a short write
    w1 = tpl[0] + tpl[1] + fresh + tpl[2] + tpl[3]
    w2 = b"x" * 100 + tpl[5] + b"y" * (C - 100) + tpl[6]
    stream = write_req(1, 0, w1) + write_req(2, 9 * C - 100, w2) + write_req(3, 0, b"z" * 512)
    t.client_bytes(stream)
    kept: dict[int, bytes] = {}
    frames = encode(t.take(), idx.keys, kept)
    saved = len(stream) - len(frames)
    assert 5 * C - 300 < saved < 5 * C  # 5 named (4 of w1, tpl[5]), each for 36 bytes, plus framing
    dec = dd.FrameDecoder(0, fd, idx)
    assert decode_all(dec, frames, kept, step=333) == stream
    assert dec.stats == {"refs": 5, "bytes_saved": 5 * C, "misses": 0}
    dec.close()


def test_a_cluster_changed_since_it_was_indexed_is_repaired_and_later_frames_wait(tmp_path: Path) -> None:
    tpl = [os.urandom(C) for _ in range(4)]
    path = image(tmp_path, tpl)
    fd, idx = index_of(path)
    with path.open("r+b") as f:  # the image changes after its keys were announced
        f.seek(C)
        f.write(os.urandom(C))
    stream = write_req(1, 0, tpl[0] + tpl[1]) + write_req(2, 2 * C, tpl[2])
    frames = encode([(stream[:28], stream[28:28 + 2 * C]), (stream[28 + 2 * C:56 + 2 * C], tpl[2])],
                    idx.keys, {})
    dec = dd.FrameDecoder(0, fd, idx)
    out, need = dec.feed(frames)
    assert out == [] and need == [C] and dec.pending_handle == 1  # write 2 held behind write 1
    out, need = dec.fill(1, C, tpl[1])
    assert b"".join(out) == stream and need == [] and dec.idle
    assert dec.stats == {"refs": 3, "bytes_saved": 2 * C, "misses": 1}
    with pytest.raises(ProtocolError, match="not asked for"):
        dec.fill(1, C, tpl[1])  # a repair nobody asked for
    dec.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.integers(0, 11), st.integers(1, 4), st.booleans(), st.sampled_from([0, 1, 700])),
                     min_size=1, max_size=8),
       changed=st.sets(st.integers(0, 11), max_size=4), step=st.integers(50, 300_000))
def test_decoded_stream_is_the_source_stream_whatever_the_image_does(
        tmp_path: Path, plan: list[tuple[int, int, bool, int]], changed: set[int], step: int) -> None:
    """Model: whatever the writes (template clusters, fresh data, misaligned) and whatever
    changes in the destination's image after indexing, QEMU there gets the source's bytes."""
    tpl = [os.urandom(C) for _ in range(12)]
    path = image(tmp_path, tpl)
    fd, idx = index_of(path)
    with path.open("r+b") as f:
        for i in changed:
            f.seek(i * C)
            f.write(os.urandom(C))
    t = capturing()
    stream = bytearray()
    for handle, (first, n, fresh, skew) in enumerate(plan, start=1):
        payload = b"".join(os.urandom(C) if fresh and k % 2 else tpl[(first + k) % 12] for k in range(n))
        stream += write_req(handle, first * C + skew, payload[skew:] if skew else payload)
    for i in range(0, len(stream), step):
        t.client_bytes(bytes(stream[i:i + step]))
    kept: dict[int, bytes] = {}
    frames = encode(t.take(), idx.keys, kept)
    dec = dd.FrameDecoder(0, fd, idx)
    assert decode_all(dec, frames, kept, step=step) == stream
    dec.close()


def test_bad_frames_and_announcements_are_refused(tmp_path: Path) -> None:
    fd, idx = index_of(image(tmp_path, [os.urandom(C)]))
    dec = dd.FrameDecoder(0, fd, idx)
    with pytest.raises(ProtocolError, match="frame type 9"):
        dec.feed(struct.pack(">BI", 9, 4) + b"abcd")
    dec = dd.FrameDecoder(0, fd, idx)
    header = write_req(1, 0, b"")[:24] + struct.pack(">I", 2 * C)
    with pytest.raises(ProtocolError, match="does not add up"):  # claims one named cluster, sends none
        dec.feed(dd._FRAME.pack(dd.T_WRITE, 28 + 4 + 10) + header + struct.pack(">I", 1) + b"0123456789")
    with pytest.raises(ProtocolError, match="frame type 0 of"):  # refused before it is buffered
        dd.FrameDecoder(0, fd, idx).feed(struct.pack(">BI", dd.T_RAW, 1 << 30))
    os.close(fd)
    keys = dd.AnnouncedKeys([0])
    with pytest.raises(ProtocolError, match="does not mirror"):
        keys.add(bytes([3]) + bytes(8))
    with pytest.raises(ProtocolError, match="bytes"):
        keys.add(bytes([0]) + bytes(7))
    keys.add(bytes([0]) + struct.pack("<QQ", 5, 2))
    with pytest.raises(ProtocolError, match="received"):
        keys.settle({"0": 3})
    with pytest.raises(ProtocolError, match="disk indices"):
        keys.settle({"²": 2})
    keys.settle({"0": 2})
    assert keys.keys[0].tolist() == [2, 5]
    with pytest.raises(ProtocolError, match="after 'prepared'"):
        keys.add(bytes([0]) + bytes(8))
    with pytest.raises(ProtocolError):
        dd.parse_need({"stream": 0, "handle": 1, "pos": []})


# ----- the relays' bookkeeping (a recording channel, no QEMU) -----------------------------
class RecordingChannel:
    def __init__(self) -> None:
        self.data: list[tuple[int, bytes]] = []
        self.ctrl: list[dict[str, object]] = []

    def write_data(self, stream: int, data: bytes) -> None:
        self.data.append((stream, bytes(data)))

    async def drain(self) -> None:
        return None

    async def send_ctrl(self, msg: dict[str, object], timeout: float = 60.0) -> None:
        self.ctrl.append(msg)


class RecordingWriter:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def test_relays_repair_each_named_cluster_once_and_forget_answered_writes(tmp_path: Path) -> None:
    """Source relay -> destination relay through a recording channel: the write arrives
    whole after one repair; a second ask for the same cluster is refused; the kept
    payload goes once the destination's reply has passed to QEMU."""
    from novacron.agent.migration.diskrelay import DestDiskRelay, SourceDiskRelay
    from novacron.agent.migration.status import MigrationStatus
    from tests.disks.test_nbdwire import simple

    tpl = [os.urandom(C) for _ in range(4)]
    path = image(tmp_path, tpl)
    fd, idx = index_of(path)
    with path.open("r+b") as f:  # cluster 1 changes after its key was announced
        f.seek(C)
        f.write(os.urandom(C))

    async def go() -> None:
        ch = RecordingChannel()
        st = MigrationStatus(id="m", vm="v", role="source", peer="b")
        src = SourceDiskRelay(ch, st, tmp_path, [0], follow_nbd=True, keys={0: idx.keys})  # type: ignore[arg-type]
        tracker = capturing()
        src.trackers[0] = tracker
        qemu_side = RecordingWriter()
        src.writers[0] = qemu_side  # type: ignore[assignment]
        req = write_req(7, 0, tpl[0] + tpl[1] + b"tail")
        tracker.client_bytes(req)
        await src._send_framed(0, tracker.take())
        assert set(src.kept) == {(0, 7)} and st.disk_dedup["clusters_named"] == 2

        dst_st = MigrationStatus(id="m", vm="v", role="destination", peer="a")
        dst = DestDiskRelay(ch, dst_st, "unused", [0], {0: dd.FrameDecoder(0, fd, idx)})  # type: ignore[arg-type]
        qemu_dest = RecordingWriter()
        dst.writers[0] = qemu_dest  # type: ignore[assignment]
        for stream, data in list(ch.data):
            await dst.deliver(stream, data)
        assert qemu_dest.out == b"" and ch.ctrl == [{"op": "disk_need", "stream": 0, "handle": 7, "pos": [C]}]
        ch.data.clear()
        src.on_need(ch.ctrl[0])
        assert [s for s, _ in ch.data] == [dd.DISK_REPAIR] and st.disk_dedup["repairs"] == 1
        with pytest.raises(ProtocolError, match="repaired already"):
            src.on_need(ch.ctrl[0])  # the same cluster again: refused, nothing queued
        with pytest.raises(ProtocolError, match="not sent by digest"):
            src.on_need({"op": "disk_need", "stream": 0, "handle": 8, "pos": [0]})
        await dst.deliver(*ch.data[0])
        assert bytes(qemu_dest.out) == req and dst.decoders[0].idle
        dst.check_settled()
        assert dst_st.disk_dedup == {"refs": 2, "bytes_saved": C, "misses": 1}
        # the reply passes to our QEMU: the kept payload goes
        src.deliver(0, simple(7))
        assert qemu_side.out == simple(7) and not src.kept
        with pytest.raises(ProtocolError, match="not framed"):
            await dst.deliver(dd.DISK_REPAIR, dd.repair_record(3, 1, 0, bytes(C)))
        await dst.close()
        assert dst.decoders == {}

    asyncio.run(go())
    with pytest.raises(OSError):
        os.fstat(fd)  # the destination relay closed the image with its decoders


@pytest.mark.parametrize("framed", [False, True])
def test_the_relay_refuses_extended_headers_and_passes_the_rest_of_the_handshake(framed: bool) -> None:
    """A QEMU >= 8.2 client asks for NBD extended headers first: the source relay's pump
    answers it NBD_REP_ERR_UNSUP itself (these exact bytes) and sends the destination
    every other byte of the handshake, in order, however the client's bytes are split."""
    from novacron.agent.migration.diskrelay import SourceDiskRelay
    from novacron.agent.migration.status import MigrationStatus

    ch = RecordingChannel()
    keys = {0: np.array([1], dtype=np.uint64)} if framed else {}
    src = SourceDiskRelay(ch, MigrationStatus(id="m", vm="v", role="source", peer="b"),  # type: ignore[arg-type]
                          Path("/nonexistent"), [0], follow_nbd=True, keys=keys)
    qemu_side = RecordingWriter()
    src.writers[0] = qemu_side  # type: ignore[assignment]
    src.trackers[0] = NbdTracker(capture=framed)
    src.deliver(0, greeting())
    flags = struct.pack(">I", 3)
    ext = option(nw.OPT_EXTENDED_HEADERS)
    rest = option(nw.OPT_STRUCTURED_REPLY) + option(nw.OPT_GO, b"\0\0\0\x05disk0\0\0")

    async def go() -> None:
        reader = asyncio.StreamReader()

        async def client() -> None:
            for b in flags + ext + rest:  # a byte at a time: every option straddles reads
                reader.feed_data(bytes([b]))
                await asyncio.sleep(0)
            reader.feed_eof()

        await asyncio.gather(client(), src._pump(0, reader))

    asyncio.run(go())
    unsup = bytes.fromhex("0003e889045565a9" "0000000b" "80000001" "00000000")  # the spec's option reply
    assert bytes(qemu_side.out) == greeting() + unsup
    sent = b"".join(d for s, d in ch.data if s == 0)
    if framed:  # T_RAW frames around the same bytes
        dec = dd.FrameDecoder(0, -1, dd.ClusterIndex(np.array([], dtype=np.uint64), np.array([], dtype=np.int64)))
        got, need = dec.feed(sent)
        sent = b"".join(got)
        assert not need
    assert sent == flags + rest  # the refused option never reaches the destination
    assert ch.ctrl == [{"op": "disk_eof", "stream": 0}] and src.error is None


def test_offline_relay_failing_drops_framed_connections() -> None:
    """Offline (qemu-img, no mirror job to keep alive): failing closes the connection so
    qemu-img fails at once, instead of being answered 'done' for the whole disk."""
    from novacron.agent.migration.diskrelay import SourceDiskRelay
    from novacron.agent.migration.status import MigrationStatus

    src = SourceDiskRelay(RecordingChannel(), MigrationStatus(id="m", vm="v", role="source", peer="b"),  # type: ignore[arg-type]
                          Path("/nonexistent"), [0], keys={0: np.array([1], dtype=np.uint64)})
    w = RecordingWriter()
    src.writers[0] = w  # type: ignore[assignment]
    src.trackers[0] = capturing()
    src.trackers[0].client_bytes(write_req(1, 0, b"x" * 10))
    src.peer_eof(0)  # the destination's export hung up
    assert src.failing and w.closed and w.out == b"" and "closed its NBD export" in (src.error or "")


def compressible_cluster() -> bytes:
    """64 KiB that zlib shrinks (so qemu-img -c stores it compressed), unlike any other."""
    return os.urandom(C // 8) + bytes(C - C // 8 - 16) + os.urandom(16)


def test_a_compressed_image_is_indexed_through_its_uncompressed_copy(tmp_path: Path) -> None:
    """A compressed qcow2 cluster has no file offset (qemu-img map): without a copy
    nothing of such an image is named; with one (vm/expanded.py), every non-zero
    cluster is, read back from the copy, and the next migration finds the copy made."""
    clusters: list[bytes | None] = [compressible_cluster() for _ in range(40)] + [None] * 8 + [os.urandom(C)]
    raw = image(tmp_path, clusters)
    tpl = tmp_path / "tpl.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    mapped = subprocess.run(["qemu-img", "map", "--output=json", str(tpl)], capture_output=True, text=True,
                            check=True).stdout
    assert '"offset"' in mapped and mapped.count('"data": true') >= 2  # some compressed, the random one not

    async def index(expanded: Expanded | None) -> tuple[int, dd.ClusterIndex, dict[str, int]]:
        stats: dict[str, int] = {}
        fd, ix = await dd._index_template(os.open(tpl, os.O_RDONLY), "qcow2", 20.0, expanded, stats)
        return fd, ix, stats

    fd, plain, _ = asyncio.run(index(None))
    os.close(fd)
    assert len(plain.keys) == 1 and plain.unmapped >= 40 * C  # only the stored (random) cluster

    expanded = Expanded(tmp_path / "disk-index", keep=2)
    fd, ix, stats = asyncio.run(index(expanded))
    try:
        assert stats == {"expanded_copies_awaited": 1, "expanded_copies_used": 1} and expanded.made == 1
        assert len(ix.keys) == 41 and not ix.unmapped
        for c in clusters:
            if c is not None:  # each named cluster reads back from the copy
                off = ix.offset_of(blake3.blake3(c).digest())
                assert off is not None and os.pread(fd, C, off) == c
    finally:
        os.close(fd)
    fd, again, stats = asyncio.run(index(expanded))
    os.close(fd)
    first = os.stat(tpl)
    assert stats == {"expanded_copies_used": 1} and expanded.made == 1 and again is ix  # made once, index kept

    # a changed image is a new copy; beyond ``keep`` the least recently used goes
    for n in range(2):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x30 + n} 0 64k", str(tpl)], check=True,
                       capture_output=True)
        fd, ix, stats = asyncio.run(index(expanded))
        os.close(fd)
        assert stats["expanded_copies_used"] == 1 and len(ix.keys) == 41, stats
    assert expanded.made == 3 and expanded.as_dict()["copies"] == 2 and expanded.as_dict()["making"] is None
    assert expanded.open(os.stat(tpl)) is not None  # the newest kept, the oldest dropped
    assert not (tmp_path / "disk-index" / Expanded.name_of(first)).exists()


def test_no_copy_where_it_would_not_fit(tmp_path: Path) -> None:
    raw = image(tmp_path, [compressible_cluster() for _ in range(8)])
    tpl = tmp_path / "tpl.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    expanded = Expanded(tmp_path / "disk-index", max_bytes=4 * C)  # the image holds 8 clusters
    stats: dict[str, int] = {}
    fd, ix = asyncio.run(dd._index_template(os.open(tpl, os.O_RDONLY), "qcow2", 20.0, expanded, stats))
    os.close(fd)
    assert len(ix.keys) == 0 and ix.unmapped == 8 * C and stats == {} and expanded.made == 0
    assert not (tmp_path / "disk-index").exists()


def compressed_image(tmp: Path, name: str, clusters: int = 8) -> Path:
    raw = tmp / f"{name}.raw"
    raw.write_bytes(b"".join(compressible_cluster() for _ in range(clusters)))
    tpl = tmp / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    return tpl


def test_one_copy_at_a_time_none_in_memory_and_a_failed_one_not_retried(tmp_path: Path) -> None:
    a, b = compressed_image(tmp_path, "a"), compressed_image(tmp_path, "b")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(C))  # a qcow2 header qemu-img cannot read

    async def run() -> None:
        expanded = Expanded(tmp_path / "disk-index")
        fa, fb, fbad = (os.open(p, os.O_RDONLY) for p in (a, b, bad))
        try:
            making = expanded.start(fa, "qcow2", os.fstat(fa), 8 * C)
            assert making is not None and expanded.start(fa, "qcow2", os.fstat(fa), 8 * C) is making
            assert expanded.start(fb, "qcow2", os.fstat(fb), 8 * C) is None  # another is being made
            assert await making and expanded.made == 1
            done = expanded.start(fa, "qcow2", os.fstat(fa), 8 * C)  # made already
            assert done is not None and done.done() and done.result() and expanded.made == 1
            failing = expanded.start(fbad, "qcow2", os.fstat(fbad), C)
            assert failing is not None and not await failing
            assert expanded.start(fbad, "qcow2", os.fstat(fbad), C) is None  # not again within the hour
            assert not [p for p in (tmp_path / "disk-index").iterdir() if p.name.endswith(".part")]
            # guest RAM lives on tmpfs: no copy there
            in_memory = Expanded(Path("/dev/shm") / f"nc-test-index-{os.getpid()}")
            assert in_memory.start(fb, "qcow2", os.fstat(fb), 8 * C) is None
            assert not in_memory.folder.exists()
        finally:
            for fd in (fa, fb, fbad):
                os.close(fd)

    asyncio.run(run())
