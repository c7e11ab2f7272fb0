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
 *          --verify-s N (seconds per background pass over all pages).
 */
#define _GNU_SOURCE
#include <errno.h>
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
static size_t npages;
static uint64_t boot_id;

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

/* Rewrite a page with fresh content and record its checksum. */
static void fill_page(size_t idx, uint64_t gen) {
    uint64_t *p = mem + idx * WORDS;
    uint64_t s = mix64(((uint64_t)idx << 32) ^ gen ^ boot_id);
    for (unsigned i = 0; i < WORDS; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p[i] = s;
    }
    sums[idx] = page_sum(p);
}

static int verify_page(size_t idx) { return page_sum(mem + idx * WORDS) == sums[idx]; }

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
    if (mem_mb < 1)
        mem_mb = 1;
    if (verify_s < 1)
        verify_s = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    npages = (size_t)mem_mb * 1024u * 1024u / PAGE;
    mem = aligned_alloc(PAGE, npages * PAGE);
    sums = calloc(npages, sizeof *sums);
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
    printf("NOVACRON-READY boot=%016llx pages=%zu mem_mb=%ld rate_mb=%ld\n",
           (unsigned long long)boot_id, npages, mem_mb, rate_mb);

    int flags = fcntl(0, F_GETFL);
    if (flags >= 0)
        fcntl(0, F_SETFL, flags | O_NONBLOCK);
    char line[256];
    size_t line_len = 0;

    const long ticks_per_s = 1000000000L / TICK_NS;
    /* pages dirtied per tick, with a fractional carry so low rates are exact */
    double dirty_per_tick = (double)rate_mb * 1024.0 * 1024.0 / PAGE / ticks_per_s;
    double dirty_carry = 0;
    double verify_per_tick = (double)npages / (double)(verify_s * ticks_per_s);
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
                sums[verify_pos] = page_sum(mem + verify_pos * WORDS); /* report once */
            }
            if (++verify_pos == npages) {
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
                    for (size_t i = 0; i < npages; i++)
                        if (!verify_page(i))
                            bad++;
                    if (bad) {
                        ok = 0;
                        bad_total += bad;
                    }
                    printf("NOVACRON-VERIFY boot=%016llx pages=%zu bad=%zu result=%s\n",
                           (unsigned long long)boot_id, npages, bad, bad ? "FAIL" : "ok");
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
