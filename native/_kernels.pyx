# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hot loops of the transfer path. Each releases the GIL and works on buffers
in place (mmap, numpy, bytes); the Python modules beside this file hold the
logic and call in here for anything that touches every page."""

from libc.stdint cimport uint8_t, int32_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport malloc, free
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.errno cimport errno, EINTR, EIO
from posix.unistd cimport pwrite
import os

cdef extern from "nc_hash.h" nogil:
    ctypedef struct nc_fp_key:
        pass
    void nc_fp_key_init(nc_fp_key *k, const unsigned char *key, size_t keylen)
    uint64_t nc_fp_page(const nc_fp_key *k, const unsigned char *page, uint64_t *nonzero)
    uint64_t nc_fp_page_wide(const nc_fp_key *k, const unsigned char *page, uint64_t *nonzero)
    uint64_t nc_fp_scan(const nc_fp_key *k, const unsigned char *mem, uint64_t first,
                        uint64_t last, uint64_t *fps, const unsigned char *mask,
                        unsigned char *dirty, unsigned char *zero, uint64_t *nzero)
    uint64_t nc_zero_scan(const unsigned char *mem, uint64_t first, uint64_t last,
                          const unsigned char *mask, unsigned char *dirty, unsigned char *zero,
                          uint64_t *nzero)
    int nc_page_is_zero(const unsigned char *page)
    int nc_page_is_zero_fast(const unsigned char *page)
    void nc_blake3_page(const unsigned char *page, unsigned char *out)
    void nc_blake3_4pages(const unsigned char **pages, unsigned char **out)
    uint64_t nc_mix64(uint64_t h)
    uint64_t nc_load64(const unsigned char *p)

cdef extern from "nc_pagemap.h" nogil:
    int nc_pagemap_bits(int fd, uint64_t addr, uint64_t npages, unsigned bit,
                        unsigned char *out, uint64_t first)
    int nc_clear_soft_dirty(int pid)

DEF PAGE = 4096

cdef enum:
    # Page kinds in plans and on the wire; REF_CACHE is plan-only (a page in
    # the receiver's cache) and travels as a REF whose source is SRC_CACHE.
    KIND_DATA = 0
    KIND_ZERO = 1
    KIND_REF = 2
    KIND_REF_CACHE = 3
    RECORD_SIZE = 16   # u64 first page, u32 count, u8 kind, 3 zero bytes
    REF_SIZE = 40      # u64 source page (or SRC_CACHE), 32-byte BLAKE3 digest
    PLAIN_HEADER = 16  # u32 records, u32 refs, u32 data pages, u32 pages
    # Receiver error codes (mapped to exceptions in stream.py).
    ERR_MALFORMED = 1
    ERR_RANGE = 2
    ERR_DEDUP_MISS = 3

cdef uint64_t SRC_CACHE = 0xFFFFFFFFFFFFFFFFULL

# Python-visible copies of the wire constants.
PY_KIND_DATA = KIND_DATA
PY_KIND_ZERO = KIND_ZERO
PY_KIND_REF = KIND_REF
PY_KIND_REF_CACHE = KIND_REF_CACHE
PY_RECORD_SIZE = RECORD_SIZE
PY_REF_SIZE = REF_SIZE
PY_PLAIN_HEADER = PLAIN_HEADER
PY_ERR_MALFORMED = ERR_MALFORMED
PY_ERR_RANGE = ERR_RANGE
PY_ERR_DEDUP_MISS = ERR_DEDUP_MISS
CACHE_VALUE = 1 << 62


cdef inline uint32_t rd32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline void wr32(unsigned char *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline void wr64(unsigned char *p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------

cdef class Fingerprinter:
    """Keyed 64-bit page fingerprints (key: at least 16 bytes of secret)."""
    cdef nc_fp_key key
    cdef readonly uint64_t zero_fp

    def __cinit__(self, bytes key):
        if len(key) < 16:
            raise ValueError("fingerprint key must be at least 16 bytes")
        nc_fp_key_init(&self.key, <const unsigned char *>key, len(key))
        cdef unsigned char zero[PAGE]
        cdef uint64_t nz
        memset(zero, 0, PAGE)
        self.zero_fp = nc_fp_page(&self.key, zero, &nz)

    def page(self, const unsigned char[::1] page):
        """Fingerprint of one page (tests and tools)."""
        if page.shape[0] != PAGE:
            raise ValueError("a page is 4096 bytes")
        cdef uint64_t nz
        return nc_fp_page(&self.key, &page[0], &nz)

    def scan(self, const unsigned char[::1] mem, uint64_t first, uint64_t last,
             uint64_t[::1] fps, unsigned char[::1] dirty, unsigned char[::1] zero,
             const unsigned char[::1] mask=None):
        """Scan pages [first, last) (first a multiple of 8), only those set in ``mask``
        when given; returns (dirty, zero) counts."""
        cdef uint64_t npages = mem.shape[0] // PAGE
        if first % 8 or first > last or last > npages or fps.shape[0] < last:
            raise ValueError("bad scan range")
        if <uint64_t>dirty.shape[0] * 8 < last or <uint64_t>zero.shape[0] * 8 < last:
            raise ValueError("bitmap too small")
        cdef const unsigned char *m = NULL
        if mask is not None:
            if <uint64_t>mask.shape[0] * 8 < last:
                raise ValueError("mask too small")
            if mask.shape[0]:
                m = &mask[0]
        cdef uint64_t nd = 0, nz = 0
        if last > first:
            with nogil:
                nd = nc_fp_scan(&self.key, &mem[0], first, last, &fps[0], m, &dirty[0],
                                &zero[0], &nz)
        return nd, nz


def zero_scan(const unsigned char[::1] mem, uint64_t first, uint64_t last,
              unsigned char[::1] dirty, unsigned char[::1] zero,
              const unsigned char[::1] mask=None):
    """Pages [first, last) (first a multiple of 8; only those set in ``mask`` when
    given): non-zero ones set in ``dirty``, zero ones in ``zero``; returns (non-zero,
    zero) counts. Reads until a page's first non-zero word (see nc_zero_scan)."""
    cdef uint64_t npages = mem.shape[0] // PAGE
    if first % 8 or first > last or last > npages:
        raise ValueError("bad scan range")
    if <uint64_t>dirty.shape[0] * 8 < last or <uint64_t>zero.shape[0] * 8 < last:
        raise ValueError("bitmap too small")
    cdef const unsigned char *m = NULL
    if mask is not None:
        if <uint64_t>mask.shape[0] * 8 < last:
            raise ValueError("mask too small")
        if mask.shape[0]:
            m = &mask[0]
    cdef uint64_t nd = 0, nz = 0
    if last > first:
        with nogil:
            nd = nc_zero_scan(&mem[0], first, last, m, &dirty[0], &zero[0], &nz)
    return nd, nz


# --------------------------------------------------------------------------
# BLAKE3 and zero checks over a list of pages
# --------------------------------------------------------------------------

def blake3_page(const unsigned char[::1] page):
    """BLAKE3-256 of exactly one 4 KiB page."""
    if page.shape[0] != PAGE:
        raise ValueError("a page is 4096 bytes")
    cdef unsigned char out[32]
    with nogil:
        nc_blake3_page(&page[0], out)
    return bytes(out[:32])


def blake3_pages4(const unsigned char[::1] a, const unsigned char[::1] b,
                  const unsigned char[::1] c, const unsigned char[::1] d):
    """BLAKE3-256 of four pages at once (the vector kernel; tests and tools)."""
    if a.shape[0] != PAGE or b.shape[0] != PAGE or c.shape[0] != PAGE or d.shape[0] != PAGE:
        raise ValueError("a page is 4096 bytes")
    cdef const unsigned char *srcs[4]
    cdef unsigned char *outs[4]
    cdef unsigned char res[4][32]
    srcs[0], srcs[1], srcs[2], srcs[3] = &a[0], &b[0], &c[0], &d[0]
    for q in range(4):
        outs[q] = res[q]
    with nogil:
        nc_blake3_4pages(srcs, outs)
    return [bytes(res[q][:32]) for q in range(4)]


def classify_pages(const unsigned char[::1] mem, const uint64_t[::1] pages, Py_ssize_t a,
                   Py_ssize_t b, uint8_t[::1] kinds, uint8_t[:, ::1] digests, bint hash_pages,
                   uint8_t[:, ::1] staging=None, Fingerprinter fper=None,
                   uint64_t[::1] fps_out=None):
    """For pages[a:b] whose kind is not already ZERO: mark all-zero pages ZERO and,
    if hash_pages, store the BLAKE3 digest of every other page. Returns zero count.

    With ``staging`` (one 4 KiB row per page), each non-zero page is first copied
    there and the copy is hashed, so the digest matches the bytes that will be
    sent even while the guest keeps writing (build_payload then reads the copy).
    With ``fper``, fps_out[i] receives the fingerprint of exactly those bytes (the
    zero-page fingerprint for zero pages), for the tracker's next comparison."""
    cdef uint64_t npages = mem.shape[0] // PAGE
    cdef Py_ssize_t i
    cdef uint64_t p, nz
    cdef Py_ssize_t zeros = 0
    cdef bint staged = staging is not None
    cdef bint fingerprint = fper is not None
    if a < 0 or b > pages.shape[0] or a > b or kinds.shape[0] < b:
        raise ValueError("bad range")
    if hash_pages and (digests.shape[0] < b or digests.shape[1] != 32):
        raise ValueError("digest array too small")
    if staged and (staging.shape[0] < b or staging.shape[1] != PAGE):
        raise ValueError("staging area too small")
    if fingerprint and (fps_out is None or fps_out.shape[0] < b):
        raise ValueError("fingerprint output too small")
    for i in range(a, b):
        if pages[i] >= npages:
            raise ValueError(f"page {pages[i]} is outside memory of {npages} pages")
    cdef const unsigned char *srcs[4]
    cdef const unsigned char *src
    cdef unsigned char *outs[4]
    cdef unsigned char spare[4][32]
    cdef int queued = 0, q
    cdef uint64_t zero_fp = fper.zero_fp if fingerprint else 0
    cdef nc_fp_key *key = &fper.key if fingerprint else NULL
    with nogil:
        for i in range(a, b):
            if kinds[i] != KIND_ZERO:
                p = pages[i]
                if nc_page_is_zero_fast(&mem[p * PAGE]):
                    kinds[i] = KIND_ZERO
            if kinds[i] == KIND_ZERO:
                zeros += 1
                if fingerprint:
                    fps_out[i] = zero_fp
                continue
            src = &mem[p * PAGE]
            if staged:
                memcpy(&staging[i, 0], src, PAGE)
                src = &staging[i, 0]
            if fingerprint:
                fps_out[i] = nc_fp_page_wide(key, src, &nz)
            if hash_pages:
                srcs[queued] = src
                outs[queued] = &digests[i, 0]
                queued += 1
                if queued == 4:
                    nc_blake3_4pages(srcs, outs)
                    queued = 0
        if queued:
            for q in range(queued, 4):
                srcs[q] = srcs[0]
                outs[q] = spare[q]
            nc_blake3_4pages(srcs, outs)
    return zeros


# --------------------------------------------------------------------------
# Digest table: open addressing, digest -> int64, keyed slot hash so a guest
# cannot line its pages up in one probe chain.
# --------------------------------------------------------------------------

DEF EMPTY = -1
DEF TOMB = -2

cdef class DigestTable:
    """Maps 32-byte digests to non-negative int64 values, in numpy-free C arrays.

    Grows by doubling up to ``max_entries``; past that, ``put`` refuses new
    digests (returns -1) so memory stays bounded."""
    cdef unsigned char *keys
    cdef int64_t *vals
    cdef uint64_t cap
    cdef uint64_t used      # live entries
    cdef uint64_t tombs
    cdef readonly uint64_t max_entries
    cdef uint64_t k0, k1
    cdef int32_t *rev       # page -> slot map kept in step when slots move
    cdef uint64_t rev_len
    cdef object rev_owner

    def __cinit__(self, uint64_t max_entries=1 << 24, uint64_t initial=1024):
        seed = os.urandom(16)
        self.k0 = int.from_bytes(seed[:8], "little")
        self.k1 = int.from_bytes(seed[8:], "little")
        self.max_entries = max(max_entries, 16)
        self.cap = 16
        while self.cap < initial * 2:
            self.cap <<= 1
        self._alloc(self.cap)

    cdef _alloc(self, uint64_t cap):
        self.keys = <unsigned char *>malloc(cap * 32)
        self.vals = <int64_t *>malloc(cap * 8)
        if self.keys == NULL or self.vals == NULL:
            raise MemoryError()
        cdef uint64_t i
        for i in range(cap):
            self.vals[i] = EMPTY
        self.used = 0
        self.tombs = 0

    def __dealloc__(self):
        free(self.keys)
        free(self.vals)

    def set_reverse(self, int32_t[::1] page_slots):
        """Keep page_slots[value] equal to the slot of each entry whose value
        indexes it, across rehashes (the sender's page -> slot map)."""
        self.rev_owner = page_slots
        self.rev = &page_slots[0] if page_slots.shape[0] else NULL
        self.rev_len = page_slots.shape[0]

    def __len__(self):
        return self.used

    @property
    def nbytes(self):
        return self.cap * 40

    cdef inline uint64_t _slot0(self, const unsigned char *d) noexcept nogil:
        return nc_mix64(nc_load64(d) ^ self.k0) ^ nc_mix64(nc_load64(d + 8) ^ self.k1)

    cdef int64_t find(self, const unsigned char *d) noexcept nogil:
        """Slot of d, or -1."""
        cdef uint64_t mask = self.cap - 1
        cdef uint64_t s = self._slot0(d) & mask
        cdef int64_t v
        while True:
            v = self.vals[s]
            if v == EMPTY:
                return -1
            if v != TOMB and memcmp(self.keys + s * 32, d, 32) == 0:
                return <int64_t>s
            s = (s + 1) & mask

    cdef int64_t value_at(self, int64_t slot) noexcept nogil:
        return self.vals[slot]

    cdef void remove_slot(self, int64_t slot) noexcept nogil:
        if self.vals[slot] >= 0:
            self.vals[slot] = TOMB
            self.used -= 1
            self.tombs += 1

    cdef int _grow(self) noexcept nogil:
        """Rehash into a table twice as big (or same size to drop tombstones)."""
        cdef uint64_t old_cap = self.cap
        cdef unsigned char *old_keys = self.keys
        cdef int64_t *old_vals = self.vals
        cdef uint64_t new_cap = old_cap
        if (self.used + 1) * 2 > old_cap:
            new_cap = old_cap * 2
        cdef unsigned char *nk = <unsigned char *>malloc(new_cap * 32)
        cdef int64_t *nv = <int64_t *>malloc(new_cap * 8)
        if nk == NULL or nv == NULL:
            free(nk)
            free(nv)
            return -1
        cdef uint64_t i, s, mask = new_cap - 1
        for i in range(new_cap):
            nv[i] = EMPTY
        self.keys = nk
        self.vals = nv
        self.cap = new_cap
        self.tombs = 0
        for i in range(old_cap):
            if old_vals[i] >= 0:
                s = self._slot0(old_keys + i * 32) & mask
                while nv[s] != EMPTY:
                    s = (s + 1) & mask
                memcpy(nk + s * 32, old_keys + i * 32, 32)
                nv[s] = old_vals[i]
                if <uint64_t>old_vals[i] < self.rev_len:
                    self.rev[old_vals[i]] = <int32_t>s
        free(old_keys)
        free(old_vals)
        return 0

    cdef int64_t insert(self, const unsigned char *d, int64_t value) noexcept nogil:
        """Set d -> value (value >= 0); returns the slot, or -1 when full."""
        cdef int64_t found = self.find(d)
        if found >= 0:
            self.vals[found] = value
            return found
        if self.used >= self.max_entries:
            return -1
        if (self.used + self.tombs + 1) * 4 > self.cap * 3:
            if self._grow() != 0:
                return -1
        cdef uint64_t mask = self.cap - 1
        cdef uint64_t s = self._slot0(d) & mask
        while self.vals[s] >= 0:
            s = (s + 1) & mask
        if self.vals[s] == TOMB:
            self.tombs -= 1
        memcpy(self.keys + s * 32, d, 32)
        self.vals[s] = value
        self.used += 1
        return <int64_t>s

    def get(self, const unsigned char[::1] digest):
        """Value stored for digest, or None."""
        if digest.shape[0] != 32:
            raise ValueError("a digest is 32 bytes")
        cdef int64_t s = self.find(&digest[0])
        return None if s < 0 else self.vals[s]

    def put(self, const unsigned char[::1] digest, int64_t value):
        """Store digest -> value (>= 0); False when the table is full."""
        if digest.shape[0] != 32 or value < 0:
            raise ValueError("a digest is 32 bytes and values are >= 0")
        return self.insert(&digest[0], value) >= 0

    def put_many(self, const uint8_t[:, ::1] digests, const int64_t[::1] values,
                 bint overwrite=True):
        """Store many digests (with overwrite=False, only absent ones); returns
        how many were stored."""
        if digests.shape[1] != 32 or values.shape[0] < digests.shape[0]:
            raise ValueError("digests must be (n, 32) with n values")
        cdef Py_ssize_t i, n = 0
        with nogil:
            for i in range(digests.shape[0]):
                if values[i] < 0 or (not overwrite and self.find(&digests[i, 0]) >= 0):
                    continue
                if self.insert(&digests[i, 0], values[i]) >= 0:
                    n += 1
        return n

    def discard(self, const unsigned char[::1] digest):
        if digest.shape[0] != 32:
            raise ValueError("a digest is 32 bytes")
        cdef int64_t s = self.find(&digest[0])
        if s >= 0:
            self.remove_slot(s)

    def digests(self):
        """All stored digests as bytes (n*32), in slot order."""
        out = bytearray(self.used * 32)
        cdef unsigned char[::1] o = out
        cdef uint64_t i, n = 0
        for i in range(self.cap):
            if self.vals[i] >= 0:
                memcpy(&o[n * 32], self.keys + i * 32, 32)
                n += 1
        return bytes(out)


# --------------------------------------------------------------------------
# Sender: dedup plan (sequential) and frame payload assembly (parallel)
# --------------------------------------------------------------------------

def plan(const uint64_t[::1] pages, uint8_t[::1] kinds, const uint8_t[:, ::1] digests,
         DigestTable table, int32_t[::1] slot_of_page, int64_t[::1] srcs,
         uint32_t frame_pages, uint32_t frame_zero_pages, bint dedup):
    """Decide how each page travels and where frames end.

    kinds come in as DATA or ZERO; DATA pages whose digest the table knows
    become REF (value >= 0: a page the receiver already holds) or REF_CACHE
    (value == cache marker). Index changes are deferred to the end of each
    frame because the receiver reads every reference of a frame before it
    writes any page of it. Returns the list of frame end offsets."""
    cdef Py_ssize_t n = pages.shape[0], i, j, start = 0
    cdef uint32_t in_frame = 0, zeros_in_frame = 0
    cdef int64_t slot, v, p
    cdef int64_t CACHE = (<int64_t>1) << 62
    ends = []
    if kinds.shape[0] < n or srcs.shape[0] < n:
        raise ValueError("plan arrays too small")
    if dedup and (digests.shape[0] < n or slot_of_page.shape[0] == 0):
        raise ValueError("dedup needs digests and a page map")
    for i in range(n):
        if dedup and pages[i] >= <uint64_t>slot_of_page.shape[0]:
            raise ValueError("page map smaller than memory")
    cdef Py_ssize_t cut
    while start < n:
        cut = n
        with nogil:
            in_frame = 0
            zeros_in_frame = 0
            for i in range(start, n):
                srcs[i] = -1
                if kinds[i] == KIND_ZERO:
                    zeros_in_frame += 1
                else:
                    if dedup:
                        slot = table.find(&digests[i, 0])
                        if slot >= 0:
                            v = table.value_at(slot)
                            if v == CACHE:
                                kinds[i] = KIND_REF_CACHE
                            else:
                                kinds[i] = KIND_REF
                                srcs[i] = v
                    in_frame += 1
                if in_frame >= frame_pages or zeros_in_frame >= frame_zero_pages:
                    cut = i + 1
                    break
            if dedup:
                # commit this frame's index changes
                for j in range(start, cut):
                    p = <int64_t>pages[j]
                    if kinds[j] == KIND_REF and srcs[j] == p:
                        continue  # unchanged page: its entry stays true
                    slot = slot_of_page[p]
                    if slot >= 0:
                        if table.value_at(slot) == p:
                            table.remove_slot(slot)
                        slot_of_page[p] = -1
                    if kinds[j] == KIND_DATA:
                        slot = table.insert(&digests[j, 0], p)
                        if slot >= 0:
                            slot_of_page[p] = <int32_t>slot
        ends.append(cut)
        start = cut
    return ends



def forget_pages(DigestTable table, int32_t[::1] slot_of_page, const uint64_t[::1] pages):
    """Drop the index entries that name these pages as holders of their digest: they
    are about to be sent without hashing, so the receiver's copy may no longer match."""
    cdef Py_ssize_t i
    cdef int64_t p, slot
    for i in range(pages.shape[0]):
        if pages[i] >= <uint64_t>slot_of_page.shape[0]:
            raise ValueError("page map smaller than memory")
    with nogil:
        for i in range(pages.shape[0]):
            p = <int64_t>pages[i]
            slot = slot_of_page[p]
            if slot >= 0:
                if table.value_at(slot) == p:
                    table.remove_slot(slot)
                slot_of_page[p] = -1


def build_payload(const unsigned char[::1] mem, const uint64_t[::1] pages,
                  const uint8_t[::1] kinds, const int64_t[::1] srcs,
                  const uint8_t[:, ::1] digests, Py_ssize_t a, Py_ssize_t b,
                  const uint8_t[:, ::1] staging=None, Fingerprinter fper=None,
                  uint64_t[::1] fps_out=None):
    """Plaintext of one frame for planned pages[a:b]: run-length records, then
    references, then the data pages copied straight from mem (or from the
    staging copies classify_pages hashed).

    With ``fper`` (no staging, no references: pages not hashed for dedup),
    fps_out[i] receives the fingerprint of the bytes copied into the frame, taken
    from that copy while it is still in cache (the zero page's for zero pages):
    the staging copy and its second read are not needed to fingerprint what is sent."""
    cdef bint staged = staging is not None
    cdef bint fingerprint = fper is not None
    if staged and (staging.shape[0] < b or staging.shape[1] != PAGE):
        raise ValueError("staging area too small")
    if fingerprint and (staged or fps_out is None or fps_out.shape[0] < b):
        raise ValueError("fingerprints are taken here only without staging, into fps_out")
    cdef uint64_t zero_fp = fper.zero_fp if fingerprint else 0
    cdef nc_fp_key *key = &fper.key if fingerprint else NULL
    cdef uint64_t nz
    cdef Py_ssize_t i, nrec = 0, nref = 0, ndata = 0
    cdef uint8_t k, wk, prevk = 255
    cdef uint64_t prevp = 0
    cdef uint64_t npages = mem.shape[0] // PAGE
    if a < 0 or b > pages.shape[0] or a > b:
        raise ValueError("bad range")
    for i in range(a, b):
        if pages[i] >= npages:
            raise ValueError("page outside memory")
        if fingerprint and kinds[i] >= KIND_REF:
            raise ValueError("references carry no page to fingerprint")
    with nogil:
        for i in range(a, b):
            k = kinds[i]
            wk = KIND_REF if k == KIND_REF_CACHE else k
            if wk == KIND_DATA:
                ndata += 1
            elif wk == KIND_REF:
                nref += 1
            if not (wk == prevk and pages[i] == prevp + 1):
                nrec += 1
            prevk = wk
            prevp = pages[i]
    cdef Py_ssize_t size = PLAIN_HEADER + nrec * RECORD_SIZE + nref * REF_SIZE + ndata * PAGE
    # uninitialised: every byte is written below, and zero-filling 1 MiB with
    # the GIL held would stall the other workers
    out = PyByteArray_FromStringAndSize(NULL, size)
    cdef unsigned char[::1] o = out
    cdef unsigned char *base = &o[0]
    cdef unsigned char *rec = base + PLAIN_HEADER
    cdef unsigned char *ref = rec + nrec * RECORD_SIZE
    cdef unsigned char *dat = ref + nref * REF_SIZE
    cdef unsigned char *cur = NULL
    cdef uint32_t count = 0
    with nogil:
        wr32(base, <uint32_t>nrec)
        wr32(base + 4, <uint32_t>nref)
        wr32(base + 8, <uint32_t>ndata)
        wr32(base + 12, <uint32_t>(b - a))
        prevk = 255
        for i in range(a, b):
            k = kinds[i]
            wk = KIND_REF if k == KIND_REF_CACHE else k
            if wk == prevk and pages[i] == prevp + 1:
                count += 1
                wr32(cur + 8, count)
            else:
                cur = rec
                rec += RECORD_SIZE
                count = 1
                wr64(cur, pages[i])
                wr32(cur + 8, 1)
                cur[12] = wk
                cur[13] = 0
                cur[14] = 0
                cur[15] = 0
            prevk = wk
            prevp = pages[i]
            if wk == KIND_DATA:
                memcpy(dat, &staging[i, 0] if staged else &mem[pages[i] * PAGE], PAGE)
                if fingerprint:
                    fps_out[i] = nc_fp_page_wide(key, dat, &nz)
                dat += PAGE
            elif wk == KIND_ZERO and fingerprint:
                fps_out[i] = zero_fp
            elif wk == KIND_REF:
                wr64(ref, SRC_CACHE if k == KIND_REF_CACHE else <uint64_t>srcs[i])
                memcpy(ref + 8, &digests[i, 0], 32)
                ref += REF_SIZE
    return out


# --------------------------------------------------------------------------
# Receiver: validate a whole frame, then write it
# --------------------------------------------------------------------------

cdef class CacheView:
    """Read-only page sources of a receiver-side page cache, for apply_payload."""
    cdef public DigestTable table
    cdef list views
    cdef uint64_t *bases
    cdef uint64_t *npages
    cdef Py_ssize_t n

    def __cinit__(self, DigestTable table, list buffers):
        self.table = table
        self.views = []
        self.n = len(buffers)
        self.bases = <uint64_t *>malloc(max(self.n, 1) * 8)
        self.npages = <uint64_t *>malloc(max(self.n, 1) * 8)
        if self.bases == NULL or self.npages == NULL:
            raise MemoryError()
        cdef const unsigned char[::1] v
        cdef Py_ssize_t i
        for i in range(self.n):
            v = buffers[i]
            self.views.append(v)
            self.bases[i] = <uint64_t><uintptr_t>&v[0] if v.shape[0] else 0
            self.npages[i] = v.shape[0] // PAGE

    def __dealloc__(self):
        free(self.bases)
        free(self.npages)

    cdef const unsigned char *locate(self, const unsigned char *digest) noexcept nogil:
        cdef int64_t slot = self.table.find(digest)
        if slot < 0:
            return NULL
        cdef int64_t v = self.table.value_at(slot)
        cdef uint64_t buf = (<uint64_t>v) >> 40
        cdef uint64_t page = (<uint64_t>v) & ((1ULL << 40) - 1)
        if buf >= <uint64_t>self.n or page >= self.npages[buf]:
            return NULL
        return <const unsigned char *><uintptr_t>(self.bases[buf] + page * PAGE)


def index_pages(const unsigned char[::1] buf, DigestTable table, uint64_t buf_no):
    """Add every non-zero page of buf to table as (buf_no << 40 | page); returns count."""
    cdef uint64_t npages = buf.shape[0] // PAGE, p, n = 0
    cdef unsigned char d[32]
    with nogil:
        for p in range(npages):
            if nc_page_is_zero(&buf[p * PAGE]):
                continue
            nc_blake3_page(&buf[p * PAGE], d)
            if table.find(d) < 0 and table.insert(d, <int64_t>((buf_no << 40) | p)) >= 0:
                n += 1
    return n


def apply_payload(const unsigned char[::1] plain, unsigned char[::1] mem, CacheView cache,
                  uint64_t max_pages, int fd=-1):
    """Check a frame's plaintext completely, then write its pages into mem.

    Returns (error code, pages written, detail). On any error nothing is written.
    ``fd``: the file ``mem`` maps (shared), or -1. Data pages then go in with pwrite:
    a tmpfs page written so is not cleared first nor mapped here, where a copy into
    the mapping faults on every page (170 MB into a 256 MiB tmpfs file, measured:
    115 ms through the mapping, 34 ms with pwrite). A failing write raises OSError
    (what went before it stays written).
    References are read (and their digests verified) before any write. Data and
    referenced pages together are at most max_pages: a 40-byte reference stands
    for a whole page, so without that bound a frame under the plaintext limit
    could expand a hundredfold (scratch space, digest work)."""
    cdef Py_ssize_t size = plain.shape[0]
    if size < PLAIN_HEADER:
        return ERR_MALFORMED, 0, "payload shorter than its header"
    cdef const unsigned char *base = &plain[0]
    cdef uint64_t nrec = rd32(base), nref = rd32(base + 4), ndata = rd32(base + 8)
    cdef uint64_t total = rd32(base + 12)
    if <uint64_t>size != PLAIN_HEADER + nrec * RECORD_SIZE + nref * REF_SIZE + ndata * PAGE:
        return ERR_MALFORMED, 0, "payload size does not match its counts"
    if nref + ndata > max_pages:
        return ERR_MALFORMED, 0, (f"{nref} references and {ndata} data pages expand past "
                                  f"{max_pages} pages, the plaintext limit of a frame")
    cdef uint64_t npages = mem.shape[0] // PAGE
    cdef const unsigned char *rec = base + PLAIN_HEADER
    cdef const unsigned char *ref = rec + nrec * RECORD_SIZE
    cdef const unsigned char *dat = ref + nref * REF_SIZE
    cdef unsigned char *dst = &mem[0] if mem.shape[0] else NULL
    cdef uint64_t i, j, first, count, src, sum_data = 0, sum_ref = 0, sum_all = 0
    cdef uint8_t kind
    # pass 1: structure and ranges
    for i in range(nrec):
        first = nc_load64(rec + i * RECORD_SIZE)
        count = rd32(rec + i * RECORD_SIZE + 8)
        kind = rec[i * RECORD_SIZE + 12]
        if kind > KIND_REF or count == 0 or rec[i * RECORD_SIZE + 13] or \
                rec[i * RECORD_SIZE + 14] or rec[i * RECORD_SIZE + 15]:
            return ERR_MALFORMED, 0, f"record {i} is malformed"
        if first >= npages or count > npages - first:
            return ERR_RANGE, 0, f"record {i} reaches past memory ({npages} pages)"
        sum_all += count
        if kind == KIND_DATA:
            sum_data += count
        elif kind == KIND_REF:
            sum_ref += count
    if sum_data != ndata or sum_ref != nref or sum_all != total:
        return ERR_MALFORMED, 0, "record counts do not add up"
    for j in range(nref):
        src = nc_load64(ref + j * REF_SIZE)
        if src != SRC_CACHE and src >= npages:
            return ERR_RANGE, 0, f"reference {j} points past memory"
    # pass 2: resolve every reference into scratch and verify its digest
    cdef unsigned char *scratch = NULL
    cdef const unsigned char *source
    cdef unsigned char d[32]
    cdef int missing = 0
    cdef uint64_t bad = 0
    cdef bint have_cache = cache is not None
    if nref:
        scratch = <unsigned char *>malloc(nref * PAGE)
        if scratch == NULL:
            raise MemoryError()
    with nogil:
        for j in range(nref):
            src = nc_load64(ref + j * REF_SIZE)
            if src == SRC_CACHE:
                source = cache.locate(ref + j * REF_SIZE + 8) if have_cache else NULL
                if source == NULL:
                    missing = 1
                    bad = j
                    break
            else:
                source = dst + src * PAGE
            memcpy(scratch + j * PAGE, source, PAGE)
            nc_blake3_page(scratch + j * PAGE, d)
            if memcmp(d, ref + j * REF_SIZE + 8, 32) != 0:
                missing = 2
                bad = j
                break
    if missing:
        free(scratch)
        if missing == 1:
            return ERR_DEDUP_MISS, 0, f"reference {bad}: page not in the receiver's cache"
        return ERR_DEDUP_MISS, 0, f"reference {bad}: digest does not match the source page"
    # pass 3: write
    cdef uint64_t r = 0
    cdef int io_err = 0
    cdef ssize_t n
    cdef size_t left
    cdef const unsigned char *p
    cdef uint64_t off
    with nogil:
        for i in range(nrec):
            first = nc_load64(rec + i * RECORD_SIZE)
            count = rd32(rec + i * RECORD_SIZE + 8)
            kind = rec[i * RECORD_SIZE + 12]
            if kind == KIND_DATA:
                if fd >= 0:
                    p, left, off = dat, count * PAGE, first * PAGE
                    while left > 0:
                        n = pwrite(fd, p, left, off)
                        if n < 0:
                            if errno == EINTR:
                                continue
                            io_err = errno
                            break
                        if n == 0:
                            io_err = EIO
                            break
                        left -= n
                        p += n
                        off += n
                    if io_err:
                        break
                else:
                    memcpy(dst + first * PAGE, dat, count * PAGE)
                dat += count * PAGE
            elif kind == KIND_ZERO:
                memset(dst + first * PAGE, 0, count * PAGE)
            else:
                for j in range(count):
                    memcpy(dst + (first + j) * PAGE, scratch + r * PAGE, PAGE)
                    r += 1
    free(scratch)
    if io_err:
        raise OSError(io_err, f"writing guest memory: {os.strerror(io_err)}")
    return 0, total, ""


def uninitialized_bytearray(Py_ssize_t size):
    """A bytearray of ``size`` bytes left as the allocator gave them: for a buffer the
    caller fills completely before anyone reads it (a received frame), where zeroing
    it first is a wasted pass over memory."""
    if size < 0:
        raise ValueError("size must not be negative")
    return PyByteArray_FromStringAndSize(NULL, size)


def copy_into(const unsigned char[::1] src, unsigned char[::1] dst, int threads=1):
    """memcpy of src into dst (the benchmark's reference), GIL released."""
    if dst.shape[0] < src.shape[0]:
        raise ValueError("destination too small")
    if src.shape[0] == 0:
        return
    with nogil:
        memcpy(&dst[0], &src[0], src.shape[0])



# --------------------------------------------------------------------------
# Frames built in place
# --------------------------------------------------------------------------

cdef class FrameBuffer:
    """A new bytes object of header + body_len + 16 bytes whose tail (after the
    header) is exposed as a writable buffer until ``frame`` is taken, so the
    AEAD can encrypt straight into the frame: no concatenation, no second
    1 MiB allocation. Filling a bytes object before anyone else holds it is the
    usual C-API way of building one."""
    cdef object _frame
    cdef Py_ssize_t _offset, _size
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]
    cdef int _exports
    cdef bint _taken

    def __cinit__(self, const unsigned char[::1] header, Py_ssize_t body_len):
        cdef Py_ssize_t hl = header.shape[0]
        if body_len < 0:
            raise ValueError("negative body length")
        self._frame = PyBytes_FromStringAndSize(NULL, hl + body_len + 16)
        if hl:
            memcpy(<unsigned char *>PyBytes_AS_STRING(self._frame), &header[0], hl)
        self._offset = hl
        self._size = body_len + 16
        self._exports = 0
        self._taken = False

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self._taken:
            raise BufferError("frame already handed out")
        buffer.buf = PyBytes_AS_STRING(self._frame) + self._offset
        buffer.obj = self
        buffer.len = self._size
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        self._shape[0] = self._size
        self._strides[0] = 1
        buffer.shape = self._shape
        buffer.strides = self._strides
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    @property
    def frame(self):
        """The finished frame (once no writable view is left)."""
        if self._exports:
            raise BufferError("frame is still being written")
        self._taken = True
        return self._frame


# --------------------------------------------------------------------------
# Another process's page tables (nc_pagemap.h; see softdirty.py)
# --------------------------------------------------------------------------

def pagemap_bits(int fd, uint64_t addr, uint64_t npages, unsigned bit,
                 unsigned char[::1] out, uint64_t first):
    """Set bit first+i of ``out`` for each of the npages pagemap entries from ``addr``
    (pagemap open at ``fd``) that has ``bit`` or the swap bit."""
    if bit > 63 or addr % PAGE:
        raise ValueError("bad pagemap bit or unaligned address")
    if npages == 0:
        return
    if (first + npages + 7) // 8 > <uint64_t>out.shape[0]:
        raise ValueError("bitmap too small")
    cdef int rc
    with nogil:
        rc = nc_pagemap_bits(fd, addr, npages, bit, &out[0], first)
    if rc:
        raise OSError(-rc, os.strerror(-rc))


def clear_soft_dirty(int pid):
    """Clear the soft-dirty bits of every mapping of process ``pid``."""
    cdef int rc
    with nogil:
        rc = nc_clear_soft_dirty(pid)
    if rc:
        raise OSError(-rc, f"/proc/{pid}/clear_refs: {os.strerror(-rc)}")
