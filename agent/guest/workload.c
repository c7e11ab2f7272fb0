/*
 * NovaCron test-guest workload.
 *
 * Dirties guest memory at a set rate, keeps a checksum per 4 KiB page and
 * re-verifies them, so a live migration that loses or corrupts a page is seen
 * by the guest itself. Prints one heartbeat line per second on the console:
 *
 *   NOVACRON-HB boot=<id> seq=<n> uptime=<s> ok=<0|1> bad=<pages> passes=<n> dirtied_mb=<n>
 *
 * A line "verify" on stdin (the serial console) runs a full check at once and
 * prints "NOVACRON-VERIFY boot=<id> pages=<n> bad=<n> result=ok|FAIL".
 *
 * Options: --mem-mb N (working set), --rate-mb N (MB/s dirtied),
 *          --verify-s N (seconds per background pass over all pages),
 *          --profile random|realistic (what the working set holds, below),
 *          --files DIR (realistic: also check the page cache of every file under DIR).
 *
 * Profiles:
 *   random     every page random (seeded per boot): the worst case for compression
 *              and dedup. The default.
 *   realistic  the working set in runs of 16 pages (64 KiB) of one kind each, laid out
 *              the same in every VM: 30 % zero pages, 40 % text-like pages (English
 *              words from a fixed vocabulary, compressible about 3-4x) and 30 % random
 *              pages; the text and random content is seeded per boot, so two VMs'
 *              heaps differ. A rewrite keeps a page's kind. With --files, every file
 *              under DIR (the image's page-cache set, identical in every VM booted from
 *              the image) is mapped read-only and its pages are checked too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <ftw.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define TICK_NS 20000000L /* 20 ms: 50 ticks per heartbeat */

static uint64_t *mem;
static uint64_t *sums;
static size_t npages;   /* pages of the working set (mem) */
static size_t nchecked; /* npages + the page-cache pages of the mapped files */
static uint64_t boot_id;
static int realistic;
/* realistic: pages of the mapped page-cache files, checked after the working set */
static const uint64_t **fpages;
static size_t nfpages, fcap;

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t page_sum(const uint64_t *p) {
    uint64_t h = 0x9e3779b97f4a7c15ULL;
    for (unsigned i = 0; i < WORDS; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL + i;
    return mix64(h);
}

static const uint64_t *page_at(size_t idx) {
    return idx < npages ? mem + idx * WORDS : fpages[idx - npages];
}

enum kind { KIND_ZERO, KIND_TEXT, KIND_RANDOM };

/* realistic: the kind of page idx, in 16-page runs, the same layout in every VM
 * (it depends on the index only): 30 % zero, 40 % text, 30 % random */
static enum kind page_kind(size_t idx) {
    if (!realistic)
        return KIND_RANDOM;
    unsigned r = (unsigned)(mix64(((uint64_t)(idx / 16)) ^ 0x6e6f7661636f6eULL) % 100);
    return r < 30 ? KIND_ZERO : r < 70 ? KIND_TEXT : KIND_RANDOM;
}

static const char *const VOCAB[] = {
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
    "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "memory", "page", "host", "virtual", "machine", "kernel", "process", "network",
    "migration", "system", "file", "data", "time", "state", "device", "value",
};
#define NVOCAB (sizeof VOCAB / sizeof VOCAB[0])

static uint64_t xorshift(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Rewrite a page with fresh content of its kind and record its checksum. */
static void fill_page(size_t idx, uint64_t gen) {
    uint64_t *p = mem + idx * WORDS;
    uint64_t s = mix64(((uint64_t)idx << 32) ^ gen ^ boot_id);
    switch (page_kind(idx)) {
    case KIND_ZERO:
        memset(p, 0, PAGE);
        break;
    case KIND_TEXT: {
        /* words and separators, a line break every few words: text-like, compressible */
        char *c = (char *)p;
        size_t n = 0;
        while (n < PAGE) {
            uint64_t r = xorshift(&s);
            const char *w = VOCAB[(r >> 8) % NVOCAB];
            while (*w && n < PAGE)
                c[n++] = *w++;
            if (n < PAGE)
                c[n++] = (r & 7) == 0 ? '\n' : ' ';
        }
        break;
    }
    case KIND_RANDOM:
        for (unsigned i = 0; i < WORDS; i++)
            p[i] = xorshift(&s);
        break;
    }
    sums[idx] = page_sum(p);
}

static int verify_page(size_t idx) { return page_sum(page_at(idx)) == sums[idx]; }

/* nftw callback: map a regular file read-only (its page-cache pages) and list its pages */
static int map_file(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)ftw;
    if (type != FTW_F || !S_ISREG(st->st_mode) || st->st_size == 0)
        return 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    size_t len = (size_t)st->st_size;
    void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return 0;
    for (size_t off = 0; off < len; off += PAGE) {
        if (nfpages == fcap) {
            fcap = fcap ? fcap * 2 : 4096;
            fpages = realloc(fpages, fcap * sizeof *fpages);
            if (!fpages)
                return -1;
        }
        fpages[nfpages++] = (const uint64_t *)((const char *)m + off);
    }
    return 0;
}

static double now_s(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double uptime_s(void) {
    /* the guest's own uptime: carries on across a live migration, resets on reboot */
    return now_s(CLOCK_BOOTTIME);
}

static long arg_long(int argc, char **argv, const char *name, long dflt) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) {
            char *end;
            long v = strtol(argv[i + 1], &end, 10);
            if (*end == '\0' && v >= 0)
                return v;
            fprintf(stderr, "workload: bad value for %s: %s\n", name, argv[i + 1]);
            exit(2);
        }
    return dflt;
}

int main(int argc, char **argv) {
    long mem_mb = arg_long(argc, argv, "--mem-mb", 32);
    long rate_mb = arg_long(argc, argv, "--rate-mb", 4);
    long verify_s = arg_long(argc, argv, "--verify-s", 4);
    const char *profile = "random", *files = NULL;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--profile") == 0)
            profile = argv[i + 1];
        else if (strcmp(argv[i], "--files") == 0)
            files = argv[i + 1];
    }
    if (strcmp(profile, "realistic") == 0) {
        realistic = 1;
    } else if (strcmp(profile, "random") != 0) {
        fprintf(stderr, "workload: unknown profile %s (random or realistic)\n", profile);
        return 2;
    }
    if (mem_mb < 1)
        mem_mb = 1;
    if (verify_s < 1)
        verify_s = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    npages = (size_t)mem_mb * 1024u * 1024u / PAGE;
    if (realistic && files && nftw(files, map_file, 16, FTW_PHYS) != 0) {
        printf("NOVACRON-ERROR cannot map the files under %s\n", files);
        return 1;
    }
    nchecked = npages + nfpages;
    mem = aligned_alloc(PAGE, npages * PAGE);
    sums = calloc(nchecked, sizeof *sums);
    if (!mem || !sums) {
        printf("NOVACRON-ERROR cannot allocate %ld MB\n", mem_mb);
        return 1;
    }
    {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        boot_id = mix64((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid());
    }
    uint64_t gen = 1;
    for (size_t i = 0; i < npages; i++)
        fill_page(i, gen);
    for (size_t i = npages; i < nchecked; i++)
        sums[i] = page_sum(page_at(i)); /* the files' pages as read now: never rewritten */
    printf("NOVACRON-READY boot=%016llx pages=%zu mem_mb=%ld rate_mb=%ld profile=%s file_pages=%zu\n",
           (unsigned long long)boot_id, npages, mem_mb, rate_mb, profile, nfpages);

    int flags = fcntl(0, F_GETFL);
    if (flags >= 0)
        fcntl(0, F_SETFL, flags | O_NONBLOCK);
    char line[256];
    size_t line_len = 0;

    const long ticks_per_s = 1000000000L / TICK_NS;
    /* pages dirtied per tick, with a fractional carry so low rates are exact */
    double dirty_per_tick = (double)rate_mb * 1024.0 * 1024.0 / PAGE / ticks_per_s;
    double dirty_carry = 0;
    double verify_per_tick = (double)nchecked / (double)(verify_s * ticks_per_s);
    double verify_carry = 0;
    size_t verify_pos = 0;
    uint64_t rng = boot_id | 1;
    uint64_t seq = 0, bad_total = 0, passes = 0, dirtied_pages = 0;
    int ok = 1;
    long tick = 0;

    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        dirty_carry += dirty_per_tick;
        while (dirty_carry >= 1.0) {
            rng = mix64(rng + 0x9e3779b97f4a7c15ULL);
            fill_page((size_t)(rng % npages), ++gen);
            dirtied_pages++;
            dirty_carry -= 1.0;
        }
        verify_carry += verify_per_tick;
        while (verify_carry >= 1.0) {
            if (!verify_page(verify_pos)) {
                bad_total++;
                ok = 0;
                printf("NOVACRON-BAD page=%zu\n", verify_pos);
                sums[verify_pos] = page_sum(page_at(verify_pos)); /* report once */
            }
            if (++verify_pos == nchecked) {
                verify_pos = 0;
                passes++;
            }
            verify_carry -= 1.0;
        }

        ssize_t n;
        char c;
        while ((n = read(0, &c, 1)) == 1) {
            if (c == '\n' || c == '\r') {
                line[line_len] = '\0';
                if (strcmp(line, "verify") == 0) {
                    size_t bad = 0;
                    for (size_t i = 0; i < nchecked; i++)
                        if (!verify_page(i))
                            bad++;
                    if (bad) {
                        ok = 0;
                        bad_total += bad;
                    }
                    printf("NOVACRON-VERIFY boot=%016llx pages=%zu bad=%zu result=%s\n",
                           (unsigned long long)boot_id, nchecked, bad, bad ? "FAIL" : "ok");
                }
                line_len = 0;
            } else if (line_len + 1 < sizeof line) {
                line[line_len++] = c;
            }
        }

        if (++tick % ticks_per_s == 0) {
            printf("NOVACRON-HB boot=%016llx seq=%llu uptime=%.2f ok=%d bad=%llu passes=%llu "
                   "dirtied_mb=%llu\n",
                   (unsigned long long)boot_id, (unsigned long long)++seq, uptime_s(), ok,
                   (unsigned long long)bad_total, (unsigned long long)passes,
                   (unsigned long long)(dirtied_pages * PAGE >> 20));
        }
        next.tv_nsec += TICK_NS;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        /* if we fell behind (slow TCG, paused VM) resynchronise instead of bursting */
        struct timespec cur;
        clock_gettime(CLOCK_MONOTONIC, &cur);
        if (cur.tv_sec > next.tv_sec + 1)
            next = cur;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
    }
}
