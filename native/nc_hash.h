/* Page hashing kernels for novacron.native: a keyed 64-bit page fingerprint
 * and BLAKE3 of one 4 KiB page. Written for this project; plain C99 with GCC
 * vector extensions. No -march flags: where GCC supports it, the hot loops are
 * compiled twice (AVX2 and baseline) and the loader picks one at run time
 * (target_clones), so the same binary runs on any x86-64. */
#ifndef NC_HASH_H
#define NC_HASH_H

#include <stdint.h>
#include <string.h>

#define NC_PAGE 4096

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NC_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#define NC_MULTIVERSION_WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NC_MULTIVERSION
#define NC_MULTIVERSION_WIDE
#endif

static inline uint64_t nc_load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* little-endian hosts only (x86-64, aarch64) */
}

static inline uint32_t nc_load32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---------------------------------------------------------------------------
 * Keyed fingerprint. 8 independent 64-bit lanes walk the page in 64-byte
 * stripes; every word is mixed with a per-(stripe, lane) secret derived from
 * the migration key and folded in with a 32x32->64 multiply (which vectorises
 * on SSE2/AVX2). The guest never sees the key, so it cannot aim for
 * collisions. The same pass ORs all words together to spot zero pages.
 * ------------------------------------------------------------------------- */
#define NC_FP_SECRET_WORDS (64 + 8)

typedef struct {
    uint64_t secret[NC_FP_SECRET_WORDS];
    uint64_t seed;
} nc_fp_key;

static inline uint64_t nc_splitmix(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t nc_mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 33;
    return h;
}

/* key: 32 bytes of secret material (only its own entropy matters). */
static void nc_fp_key_init(nc_fp_key *k, const unsigned char *key, size_t keylen) {
    uint64_t state = 0x6E6F766163726F6EULL; /* "novacron" */
    for (size_t i = 0; i < keylen; i++) {
        state = nc_mix64(state ^ ((uint64_t)key[i] << ((i & 7) * 8)) ^ i);
    }
    for (int i = 0; i < NC_FP_SECRET_WORDS; i++) k->secret[i] = nc_splitmix(&state);
    k->seed = nc_splitmix(&state);
}

/* Fingerprint one page; *nonzero receives the OR of all its words. */
static inline uint64_t nc_fp_page(const nc_fp_key *k, const unsigned char *page,
                                  uint64_t *nonzero) {
    uint64_t acc[8];
    uint64_t any = 0;
    for (int j = 0; j < 8; j++) acc[j] = k->seed ^ k->secret[j];
    for (int s = 0; s < 64; s++) {
        const unsigned char *p = page + s * 64;
        for (int j = 0; j < 8; j++) {
            uint64_t w = nc_load64(p + 8 * j);
            uint64_t v = w ^ k->secret[s + j];
            any |= w;
            acc[j] += (v & 0xFFFFFFFFULL) * (v >> 32);
            acc[j ^ 1] += w;
        }
    }
    uint64_t h = k->seed;
    for (int j = 0; j < 8; j++) h = nc_mix64(h ^ acc[j]) + (uint64_t)j;
    *nonzero = any;
    return h;
}

/* nc_fp_page compiled for the widest vectors the CPU has: for callers outside this
 * header's multiversioned loops (the frame builder fingerprints what it copies). */
NC_MULTIVERSION_WIDE
static uint64_t nc_fp_page_wide(const nc_fp_key *k, const unsigned char *page, uint64_t *nonzero) {
    return nc_fp_page(k, page, nonzero);
}

/* Scan pages [first, last): update stored fingerprints, set dirty/zero bits.
 * first must be a multiple of 8 so that threads own whole bitmap bytes.
 * mask (NULL: every page) limits the scan to the pages whose bit is set; the
 * others read as neither dirty nor zero and keep their fingerprints.
 * Returns the number of dirty pages. */
NC_MULTIVERSION_WIDE
static uint64_t nc_fp_scan(const nc_fp_key *k, const unsigned char *mem, uint64_t first,
                           uint64_t last, uint64_t *fps, const unsigned char *mask,
                           unsigned char *dirty, unsigned char *zero, uint64_t *nzero) {
    uint64_t ndirty = 0, zeros = 0;
    for (uint64_t byte = first >> 3; byte < (last + 7) >> 3; byte++) {
        unsigned char dbits = 0, zbits = 0;
        unsigned want = mask ? mask[byte] : 0xffu;
        for (unsigned bit = 0; want && bit < 8; bit++) {
            uint64_t i = (byte << 3) + bit;
            if (i >= last) break;
            if (!(want & (1u << bit))) continue;
            uint64_t nz;
            uint64_t h = nc_fp_page(k, mem + i * NC_PAGE, &nz);
            if (h != fps[i]) {
                fps[i] = h;
                dbits |= (unsigned char)(1u << bit);
                ndirty++;
            }
            if (!nz) {
                zbits |= (unsigned char)(1u << bit);
                zeros++;
            }
        }
        dirty[byte] = dbits;
        zero[byte] = zbits;
    }
    *nzero = zeros;
    return ndirty;
}

/* The first scan of a fresh tracker (every stored fingerprint is still the zero
 * page's): only whether each page is zero matters, since every other page is sent
 * next and its fingerprint recorded from the bytes sent. A non-zero page usually
 * shows so in its first cache line, so this reads a fraction of what fingerprinting
 * reads. Sets dirty (non-zero) and zero bits of pages [first, last) in mask (NULL:
 * all); first a multiple of 8. Returns the number of non-zero pages. */
NC_MULTIVERSION
static uint64_t nc_zero_scan(const unsigned char *mem, uint64_t first, uint64_t last,
                             const unsigned char *mask, unsigned char *dirty,
                             unsigned char *zero, uint64_t *nzero) {
    uint64_t nonzero = 0, zeros = 0;
    for (uint64_t byte = first >> 3; byte < (last + 7) >> 3; byte++) {
        unsigned char dbits = 0, zbits = 0;
        unsigned want = mask ? mask[byte] : 0xffu;
        for (unsigned bit = 0; want && bit < 8; bit++) {
            uint64_t i = (byte << 3) + bit;
            if (i >= last) break;
            if (!(want & (1u << bit))) continue;
            const unsigned char *page = mem + i * NC_PAGE;
            uint64_t any = 0;
            for (int s = 0; s < NC_PAGE && !any; s += 64)
                for (int j = 0; j < 64; j += 8) any |= nc_load64(page + s + j);
            if (any) {
                dbits |= (unsigned char)(1u << bit);
                nonzero++;
            } else {
                zbits |= (unsigned char)(1u << bit);
                zeros++;
            }
        }
        dirty[byte] = dbits;
        zero[byte] = zbits;
    }
    *nzero = zeros;
    return nonzero;
}

/* True when the page is all zero bytes. */
static inline int nc_page_is_zero(const unsigned char *page) {
    uint64_t any = 0;
    for (int i = 0; i < NC_PAGE; i += 8) any |= nc_load64(page + i);
    return any == 0;
}

/* The same, looking at the first cache line alone first: most non-zero pages show
 * it there, and the rest of the page is then not read (nor pulled into cache). */
static inline int nc_page_is_zero_fast(const unsigned char *page) {
    uint64_t any = 0;
    for (int i = 0; i < 64; i += 8) any |= nc_load64(page + i);
    return any == 0 && nc_page_is_zero(page);
}

/* ---------------------------------------------------------------------------
 * BLAKE3 (unkeyed hash mode, 32-byte output) of exactly one 4 KiB page.
 * A page is four 1 KiB chunks; the four chunk compressions run side by side
 * in the four lanes of a 128-bit vector, then three parent compressions
 * (two inner, one root) finish the tree. Checked against the blake3 package
 * in tests/native.
 * ------------------------------------------------------------------------- */
typedef uint32_t nc_u32x4 __attribute__((vector_size(16)));

static const uint32_t NC_B3_IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                                     0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
static const uint8_t NC_B3_PERM[16] = {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8};
enum { NC_B3_CHUNK_START = 1, NC_B3_CHUNK_END = 2, NC_B3_PARENT = 4, NC_B3_ROOT = 8 };

#define NC_ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

#define NC_B3_G(v, a, b, c, d, mx, my)                                                   \
    do {                                                                                 \
        v[a] = v[a] + v[b] + (mx);                                                       \
        v[d] = NC_ROTR32(v[d] ^ v[a], 16);                                               \
        v[c] = v[c] + v[d];                                                              \
        v[b] = NC_ROTR32(v[b] ^ v[c], 12);                                               \
        v[a] = v[a] + v[b] + (my);                                                       \
        v[d] = NC_ROTR32(v[d] ^ v[a], 8);                                                \
        v[c] = v[c] + v[d];                                                              \
        v[b] = NC_ROTR32(v[b] ^ v[c], 7);                                                \
    } while (0)

#define NC_B3_ROUND(v, m)                                                                \
    do {                                                                                 \
        NC_B3_G(v, 0, 4, 8, 12, m[0], m[1]);                                             \
        NC_B3_G(v, 1, 5, 9, 13, m[2], m[3]);                                             \
        NC_B3_G(v, 2, 6, 10, 14, m[4], m[5]);                                            \
        NC_B3_G(v, 3, 7, 11, 15, m[6], m[7]);                                            \
        NC_B3_G(v, 0, 5, 10, 15, m[8], m[9]);                                            \
        NC_B3_G(v, 1, 6, 11, 12, m[10], m[11]);                                          \
        NC_B3_G(v, 2, 7, 8, 13, m[12], m[13]);                                           \
        NC_B3_G(v, 3, 4, 9, 14, m[14], m[15]);                                           \
    } while (0)

/* Scalar compression used for the three parent nodes; out gets 8 words. */
static void nc_b3_compress1(const uint32_t cv[8], const uint32_t block[16], uint32_t flags,
                            uint32_t out[8]) {
    uint32_t v[16], m[16], t[16];
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    for (int i = 0; i < 4; i++) v[8 + i] = NC_B3_IV[i];
    v[12] = 0; /* counter low: parents use 0 */
    v[13] = 0;
    v[14] = 64;
    v[15] = flags;
    memcpy(m, block, sizeof(m));
    for (int r = 0; r < 7; r++) {
        NC_B3_ROUND(v, m);
        if (r < 6) {
            for (int i = 0; i < 16; i++) t[i] = m[NC_B3_PERM[i]];
            memcpy(m, t, sizeof(m));
        }
    }
    for (int i = 0; i < 8; i++) out[i] = v[i] ^ v[i + 8];
}

NC_MULTIVERSION
static void nc_blake3_page(const unsigned char *page, unsigned char out[32]) {
    nc_u32x4 cv[8];
    for (int i = 0; i < 8; i++) cv[i] = (nc_u32x4){NC_B3_IV[i], NC_B3_IV[i], NC_B3_IV[i], NC_B3_IV[i]};
    const nc_u32x4 counter = {0, 1, 2, 3};
    for (int b = 0; b < 16; b++) {
        nc_u32x4 m[16], t[16], v[16];
        const unsigned char *p = page + b * 64;
        for (int i = 0; i < 16; i++) {
            m[i] = (nc_u32x4){nc_load32(p + 4 * i), nc_load32(p + 1024 + 4 * i),
                              nc_load32(p + 2048 + 4 * i), nc_load32(p + 3072 + 4 * i)};
        }
        uint32_t flags = (b == 0 ? NC_B3_CHUNK_START : 0) | (b == 15 ? NC_B3_CHUNK_END : 0);
        for (int i = 0; i < 8; i++) v[i] = cv[i];
        for (int i = 0; i < 4; i++) v[8 + i] = (nc_u32x4){NC_B3_IV[i], NC_B3_IV[i], NC_B3_IV[i], NC_B3_IV[i]};
        v[12] = counter;
        v[13] = (nc_u32x4){0, 0, 0, 0};
        v[14] = (nc_u32x4){64, 64, 64, 64};
        v[15] = (nc_u32x4){flags, flags, flags, flags};
        for (int r = 0; r < 7; r++) {
            NC_B3_ROUND(v, m);
            if (r < 6) {
                for (int i = 0; i < 16; i++) t[i] = m[NC_B3_PERM[i]];
                memcpy(m, t, sizeof(m));
            }
        }
        for (int i = 0; i < 8; i++) cv[i] = v[i] ^ v[i + 8];
    }
    /* Chaining values of chunks 0..3 sit in lanes 0..3. */
    uint32_t chunk[4][8];
    for (int i = 0; i < 8; i++)
        for (int l = 0; l < 4; l++) chunk[l][i] = cv[i][l];
    uint32_t block[16], left[8], right[8], root[8];
    memcpy(block, chunk[0], 32);
    memcpy(block + 8, chunk[1], 32);
    nc_b3_compress1(NC_B3_IV, block, NC_B3_PARENT, left);
    memcpy(block, chunk[2], 32);
    memcpy(block + 8, chunk[3], 32);
    nc_b3_compress1(NC_B3_IV, block, NC_B3_PARENT, right);
    memcpy(block, left, 32);
    memcpy(block + 8, right, 32);
    nc_b3_compress1(NC_B3_IV, block, NC_B3_PARENT | NC_B3_ROOT, root);
    memcpy(out, root, 32); /* little-endian words */
}

/* Four pages at once: 16 lanes (page-major, then chunk). The 64 chunk blocks
 * run in all lanes, the 8 inner parents in lanes 0-7, the 4 roots in 0-3; on
 * AVX-512 one vector holds all 16 lanes (and rotations are one instruction),
 * elsewhere GCC splits the vectors. */
typedef uint32_t nc_u32x16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) void
nc_b3_compress16(nc_u32x16 cv[8], nc_u32x16 m[16], nc_u32x16 counter, uint32_t flags) {
    nc_u32x16 v[16], t[16];
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    for (int i = 0; i < 4; i++) v[8 + i] = (nc_u32x16){} + NC_B3_IV[i];
    v[12] = counter;
    v[13] = (nc_u32x16){};
    v[14] = (nc_u32x16){} + 64u;
    v[15] = (nc_u32x16){} + flags;
    for (int r = 0; r < 7; r++) {
        NC_B3_ROUND(v, m);
        if (r < 6) {
            for (int i = 0; i < 16; i++) t[i] = m[NC_B3_PERM[i]];
            for (int i = 0; i < 16; i++) m[i] = t[i];
        }
    }
    for (int i = 0; i < 8; i++) cv[i] = v[i] ^ v[i + 8];
}

NC_MULTIVERSION_WIDE
static void nc_blake3_4pages(const unsigned char *const pages[4], unsigned char *const out[4]) {
    nc_u32x16 cv[8], m[16];
    nc_u32x16 counter;
    for (int l = 0; l < 16; l++) counter[l] = (uint32_t)(l & 3);
    for (int i = 0; i < 8; i++) cv[i] = (nc_u32x16){} + NC_B3_IV[i];
    for (int b = 0; b < 16; b++) {
        for (int i = 0; i < 16; i++)
            for (int l = 0; l < 16; l++)
                m[i][l] = nc_load32(pages[l >> 2] + (l & 3) * 1024 + b * 64 + 4 * i);
        uint32_t flags = (b == 0 ? NC_B3_CHUNK_START : 0) | (b == 15 ? NC_B3_CHUNK_END : 0);
        nc_b3_compress16(cv, m, counter, flags);
    }
    /* inner parents: lane l = page l>>1, left (chunks 0,1) or right (2,3) half */
    nc_u32x16 par[8];
    for (int l = 0; l < 16; l++) {
        int src = ((l >> 1) & 3) * 4 + (l & 1) * 2;
        for (int i = 0; i < 8; i++) {
            m[i][l] = cv[i][src];
            m[8 + i][l] = cv[i][src + 1];
        }
    }
    for (int i = 0; i < 8; i++) par[i] = (nc_u32x16){} + NC_B3_IV[i];
    nc_b3_compress16(par, m, (nc_u32x16){}, NC_B3_PARENT);
    /* roots: lane l = page l (lanes 4-15 repeat the work and are ignored) */
    for (int l = 0; l < 16; l++) {
        int src = (l & 3) * 2;
        for (int i = 0; i < 8; i++) {
            m[i][l] = par[i][src];
            m[8 + i][l] = par[i][src + 1];
        }
    }
    for (int i = 0; i < 8; i++) cv[i] = (nc_u32x16){} + NC_B3_IV[i];
    nc_b3_compress16(cv, m, (nc_u32x16){}, NC_B3_PARENT | NC_B3_ROOT);
    for (int p = 0; p < 4; p++) {
        uint32_t w[8];
        for (int i = 0; i < 8; i++) w[i] = cv[i][p];
        memcpy(out[p], w, 32);
    }
}

#endif /* NC_HASH_H */
