"""The have/need exchange of destination-side dedup (dedupdest.py) against a
simple model: random offers, cache pages changing under the index, source pages
changing between offer and repair, evictions (a running VM going away),
migrations failing while others wait for their pages. Whatever happens, once
every offer is answered and every miss repaired, the pages the source still
finds changed are sent, and then each surviving destination's memory equals its
source's."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.agent.migration import protocol
from novacron.agent.migration.dedupdest import IncomingDedup, PageIndex
from novacron.native import page_digest

N = 16  # pages per VM
CONTENTS = 3  # distinct non-zero page contents (collisions on purpose)
PAGE = 4096


def page(c: int) -> bytes:
    return bytes([c]) * PAGE if c else bytes(PAGE)


def ram(path: Path, contents: list[int]) -> mmap.mmap:
    path.write_bytes(b"".join(page(c) for c in contents))
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, N * PAGE)
    finally:
        os.close(fd)


class Mig:
    """The source's side of one migration, as the engine does it."""

    def __init__(self, index: PageIndex, root: Path, name: str, contents: list[int]) -> None:
        self.src = list(contents)
        self.sent = [0] * N  # what the source believes the destination holds (its fingerprints)
        self.mm = ram(root / f"{name}.ram", [0] * N)
        self.inbox: list[dict[str, Any]] = []
        self.outstanding: dict[int, set[int]] = {}
        self.repairs: list[tuple[int, list[int]]] = []
        self.batch = 0
        self.alive = True

        async def send(msg: dict[str, Any]) -> None:
            self.inbox.append(msg)  # written at once, like the channel ...
            await asyncio.sleep(0)  # ... then the drain lets others run

        self.dest = IncomingDedup(index, self.mm, root / f"{name}.ram", name, send)

    def busy(self) -> set[int]:
        out = set().union(*self.outstanding.values()) if self.outstanding else set()
        return out.union(*(set(p) for _, p in self.repairs))

    async def offer(self, pages: list[int]) -> None:
        pages = [p for p in dict.fromkeys(pages) if p not in self.busy() and self.src[p]]
        if not pages:
            return
        digests = np.stack([np.frombuffer(page_digest(page(self.src[p])), np.uint8) for p in pages])
        for p in pages:
            self.sent[p] = self.src[p]  # recorded as sent when offered (digest_pages)
        self.outstanding[self.batch] = set(pages)
        data = protocol.pack_have(self.batch, np.asarray(pages, np.uint64), digests)
        self.batch += 1
        await self.dest.on_have(data)

    def deliver(self) -> None:
        for msg in self.inbox:
            batch, seq, pages, final = protocol.check_need(msg)
            wanted = {int(p) for p in pages}
            assert wanted <= self.outstanding[batch]
            self.outstanding[batch] -= wanted
            if wanted:
                self.repairs.append((seq, sorted(wanted)))
            if final:
                del self.outstanding[batch]
        self.inbox.clear()

    def repair(self) -> None:
        for seq, pages in self.repairs:
            for p in pages:  # sent as they are now
                self.mm[p * PAGE:(p + 1) * PAGE] = page(self.src[p])
                self.sent[p] = self.src[p]
            self.dest.on_repaired({"op": "repaired", "seq": seq})
        self.repairs.clear()


ops = st.lists(st.one_of(
    st.tuples(st.just("offer"), st.integers(0, 1), st.lists(st.integers(0, N - 1), min_size=1, max_size=N)),
    st.tuples(st.just("deliver"), st.integers(0, 1)),
    st.tuples(st.just("repair"), st.integers(0, 1)),
    st.tuples(st.just("write_src"), st.integers(0, 1), st.integers(0, N - 1), st.integers(0, CONTENTS)),
    st.tuples(st.just("write_cache"), st.integers(0, N - 1), st.integers(0, CONTENTS)),
    st.tuples(st.just("evict")),
    st.tuples(st.just("fail"), st.integers(0, 1)),
    st.tuples(st.just("yield")),
), min_size=8, max_size=50)
contents = st.lists(st.integers(0, CONTENTS), min_size=N, max_size=N)


async def scenario(root: Path, cache: list[int], srcs: list[list[int]], steps: list[tuple[Any, ...]]
                   ) -> None:
    cache_mm = ram(root / "running.ram", cache)
    running = [root / "running.ram"]
    index = PageIndex(1, lambda: list(running))
    index.defer_s = 0.3  # a wait on content that never lands ends soon
    index.refresh()
    await index.wait_indexed()
    migs = [Mig(index, root, f"m{i}", s) for i, s in enumerate(srcs)]
    try:
        for step in steps:
            op = step[0]
            m = migs[step[1]] if op in ("offer", "deliver", "repair", "write_src", "fail") else None
            if m is not None and not m.alive:
                continue
            if op == "offer":
                await m.offer(step[2])
            elif op == "deliver":
                m.deliver()
            elif op == "repair":
                m.repair()
            elif op == "write_src":
                m.src[step[2]] = step[3]
            elif op == "write_cache":
                cache_mm[step[1] * PAGE:(step[1] + 1) * PAGE] = page(step[2])
            elif op == "evict":  # the running VM went away: its pages leave the index
                running.clear()
                index.refresh()
            elif op == "fail":
                m.alive = False
                await m.dest.close(committed=False)
            else:
                await asyncio.sleep(0)
        live = [m for m in migs if m.alive]
        async with asyncio.timeout(10):  # the source waits for every answer, repairing as they come
            while any(m.outstanding or m.repairs or m.inbox for m in live):
                for m in live:
                    m.deliver()
                    m.repair()
                await asyncio.sleep(0.005)
        for m in live:
            m.dest.check_settled()
            for p in range(N):  # stop-and-copy: what changed since it was offered or sent
                if m.src[p] != m.sent[p]:
                    m.mm[p * PAGE:(p + 1) * PAGE] = page(m.src[p])
            assert [m.mm[p * PAGE] for p in range(N)] == m.src
            assert bytes(m.mm) == b"".join(page(c) for c in m.src)
            await m.dest.close(committed=True)
        assert not index.flights
    finally:
        for m in migs:
            if m.alive:
                await m.dest.close(committed=False)
        for m in migs:
            m.mm.close()
        cache_mm.close()


@settings(max_examples=100, deadline=None)
@given(cache=contents, a=contents, b=contents, steps=ops)
def test_have_need_matches_the_model(cache: list[int], a: list[int], b: list[int],
                                     steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), cache, [a, b], steps))


def _have(batch: int, pages: list[int]) -> bytes:
    digests = np.zeros((len(pages), 32), np.uint8)
    return protocol.pack_have(batch, np.asarray(pages, np.uint64), digests)


def test_malformed_have_and_need_are_protocol_errors() -> None:
    import base64
    import struct

    import pytest

    from novacron.agent.channel.records import ProtocolError

    assert protocol.check_have(_have(0, [1, 2]), N, 0)[0] == 0
    bad = [
        (b"\x00" * 5, "shorter"),
        (_have(1, [1]), "out of order"),
        (_have(0, [1, 2])[:-1], "size"),
        (struct.pack("<II", 0, 3) + _have(0, [1, 2])[8:], "size"),
        (_have(0, [N]), "outside"),
        (_have(0, [3, 3]), "twice"),
    ]
    for data, why in bad:
        with pytest.raises(ProtocolError, match=why):
            protocol.check_have(data, N, 0)
    good = protocol.need_message(4, 2, [1, 5], True)
    assert protocol.check_need(good)[0] == 4 and list(protocol.check_need(good)[2]) == [1, 5]
    for msg in ({**good, "pages": "***"}, {**good, "pages": base64.b64encode(b"abc").decode()},
                {**good, "final": 1}, {**good, "batch": -1}, {**good, "seq": "0"},
                protocol.need_message(4, 2, [1, 1], False)):
        with pytest.raises(ProtocolError):
            protocol.check_need(msg)


def test_destination_refuses_repairs_it_did_not_ask_for_and_unsettled_rounds(tmp_path: Path) -> None:
    import pytest

    from novacron.agent.channel.records import ProtocolError

    async def run() -> None:
        index = PageIndex(1)
        mm = ram(tmp_path / "in.ram", [0] * N)
        sent: list[dict[str, Any]] = []

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        d = IncomingDedup(index, mm, tmp_path / "in.ram", "m", send)
        try:
            with pytest.raises(ProtocolError, match="not outstanding"):
                d.on_repaired({"op": "repaired", "seq": 0})
            digest = np.frombuffer(page_digest(page(2)), np.uint8).reshape(1, 32)
            await d.on_have(protocol.pack_have(0, np.asarray([3], np.uint64), digest))
            assert protocol.check_need(sent[0])[2].tolist() == [3]  # nothing here holds it
            with pytest.raises(ProtocolError, match="not repaired"):
                d.check_settled()  # a round may not end with page 3 missing
            mm[3 * PAGE:4 * PAGE] = page(2)
            d.on_repaired({"op": "repaired", "seq": 0})
            d.check_settled()
            assert len(index.cache) == 1  # it landed and verified: now it serves others
        finally:
            await d.close(committed=False)
            mm.close()

    asyncio.run(run())


def test_running_vms_are_indexed_in_chunks_once(tmp_path: Path, monkeypatch: Any) -> None:
    """A running VM's RAM is hashed once, a chunk per hold of the lock; a second
    refresh (the next migration) hashes nothing again; a VM gone leaves."""
    from novacron.agent.migration import dedupdest

    monkeypatch.setattr(dedupdest, "INDEX_CHUNK", 5)
    contents = [c % (CONTENTS + 1) for c in range(N)]  # repeats and zero pages
    mm = ram(tmp_path / "vm.ram", contents)
    running = [tmp_path / "vm.ram"]
    chunks: list[int] = []

    async def run() -> None:
        index = PageIndex(1, lambda: list(running))
        real = index._index_chunk

        def counted() -> bool:
            more = real()
            chunks.append(index.indexed_pages)
            return more

        index._index_chunk = counted  # type: ignore[method-assign]
        index.refresh()
        await index.wait_indexed()
        assert index.indexed_pages == N and chunks[:4] == [5, 10, 15, 16]
        assert len(index.cache) == CONTENTS  # distinct non-zero contents
        assert index.cache.lookup(page_digest(page(2))) == page(2)
        index.refresh()
        await index.wait_indexed()
        assert index.indexed_pages == N  # nothing hashed twice
        running.clear()
        index.refresh()
        assert not index._slots and index.cache.lookup(page_digest(page(2))) is None

    try:
        asyncio.run(run())
    finally:
        mm.close()


def test_a_large_batch_is_answered_in_messages_under_the_control_limit(tmp_path: Path) -> None:
    from novacron.agent.channel.records import MAX_CTRL

    big = 20_000
    path = tmp_path / "big.ram"
    with open(path, "wb") as f:
        f.truncate(big * PAGE)  # sparse: all zero

    async def run() -> None:
        fd = os.open(path, os.O_RDWR)
        mm = mmap.mmap(fd, big * PAGE)
        os.close(fd)
        sent: list[dict[str, Any]] = []

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        d = IncomingDedup(PageIndex(1), mm, path, "m", send)
        try:
            digests = np.random.default_rng(1).integers(0, 256, (big, 32), dtype=np.uint8)
            await d.on_have(protocol.pack_have(0, np.arange(big, dtype=np.uint64), digests))
        finally:
            await d.close(committed=False)
            mm.close()
        parsed = [protocol.check_need(m) for m in sent]
        assert [p[3] for p in parsed] == [False, False, True]  # final on the last only
        assert sorted(int(x) for p in parsed for x in p[2]) == list(range(big))
        assert all(len(json.dumps(m)) + 16 < MAX_CTRL for m in sent)

    asyncio.run(run())


def test_the_index_stays_within_its_bound(tmp_path: Path) -> None:
    """``dedup_index_max_mb`` bounds the table: past it new pages are not indexed
    (counted as refused), and the memory reported is within the bound."""
    pages = 12_000  # distinct contents, more than 1 MiB of index can hold
    mem = np.zeros((pages, PAGE // 8), np.uint64)
    mem[:, 0] = np.arange(1, pages + 1)
    path = tmp_path / "vm.ram"
    path.write_bytes(mem.tobytes())

    async def run() -> None:
        index = PageIndex(1, lambda: [path])
        index.refresh()
        await index.wait_indexed()
        s = index.stats()
        assert s["entries"] == index.max_entries < pages, s
        assert s["refused"] > 0 and s["memory_bytes"] <= 1 << 20, s

    asyncio.run(run())
