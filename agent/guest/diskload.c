/*
 * NovaCron test-guest disk workload.
 *
 * Rewrites 4 KiB blocks of a disk at a set rate, each stamped with its index,
 * a generation and a checksum over the whole block, and remembers in (guest)
 * memory which generation every block must hold. Every --verify-s seconds it
 * reads back every block it wrote and prints
 *
 *   NOVACRON-DISK-VERIFY boot=<id> pass=<n> written=<blocks> bad=<n> result=ok|FAIL
 *
 * so a migration that loses or reorders a disk write (or hands the guest a stale
 * copy) is seen by the guest itself. With --ref DEV every block is written to DEV
 * as well, first (a second disk that is never copied: the host can compare the two
 * files byte for byte while the guest is paused). One heartbeat line per second:
 *
 *   NOVACRON-DISK-HB boot=<id> seq=<n> writes=<n> passes=<n> bad=<n>
 *
 * I/O is O_DIRECT: a write has reached the virtual disk when pwrite returns.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define WORDS (BLOCK / 8u)
#define MAGIC 0x4e4f5641444b3031ULL /* "NOVADK01" */
#define TICK_NS 20000000L

static uint64_t boot_id;
static uint64_t *gens; /* generation each block must hold; 0: never written */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t block_sum(const uint64_t *p) {
    uint64_t h = 0x9e3779b97f4a7c15ULL;
    for (unsigned i = 0; i < WORDS - 1; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL + i;
    return mix64(h);
}

static void fill(uint64_t *p, uint64_t idx, uint64_t gen) {
    p[0] = MAGIC;
    p[1] = idx;
    p[2] = gen;
    p[3] = boot_id;
    uint64_t s = mix64(idx ^ (gen << 20) ^ boot_id);
    for (unsigned i = 4; i < WORDS - 1; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p[i] = s;
    }
    p[WORDS - 1] = block_sum(p);
}

static int check(const uint64_t *p, uint64_t idx, uint64_t gen) {
    return p[0] == MAGIC && p[1] == idx && p[2] == gen && p[3] == boot_id && p[WORDS - 1] == block_sum(p);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_dev(const char *path) {
    int fd = open(path, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("NOVACRON-DISK-ERROR open %s: %s\n", path, strerror(errno));
        exit(1);
    }
    return fd;
}

static int write_block(int fd, const void *buf, uint64_t idx) {
    return pwrite(fd, buf, BLOCK, (off_t)(idx * BLOCK)) == (ssize_t)BLOCK;
}

/* Read every written block back (in 256 KiB runs); returns the bad ones. */
static size_t verify(int fd, size_t nblocks, size_t *written) {
    enum { RUN = 64 };
    uint64_t *buf;
    if (posix_memalign((void **)&buf, BLOCK, RUN * BLOCK) != 0)
        exit(2);
    size_t bad = 0;
    *written = 0;
    for (size_t start = 0; start < nblocks; start += RUN) {
        size_t n = nblocks - start < RUN ? nblocks - start : RUN;
        ssize_t got = pread(fd, buf, n * BLOCK, (off_t)(start * BLOCK));
        for (size_t k = 0; k < n; k++) {
            size_t idx = start + k;
            if (!gens[idx])
                continue;
            (*written)++;
            if (got != (ssize_t)(n * BLOCK) || !check(buf + k * WORDS, idx, gens[idx])) {
                if (bad < 3)
                    printf("NOVACRON-DISK-BAD block=%zu want_gen=%llu got_idx=%llu got_gen=%llu\n", idx,
                           (unsigned long long)gens[idx], (unsigned long long)buf[k * WORDS + 1],
                           (unsigned long long)buf[k * WORDS + 2]);
                bad++;
            }
        }
    }
    free(buf);
    return bad;
}

int main(int argc, char **argv) {
    const char *dev = "/dev/vda", *ref = NULL;
    long rate_kb = 256, verify_s = 3;
    size_t nblocks = 2048;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--dev")) dev = argv[i + 1];
        else if (!strcmp(argv[i], "--ref")) ref = argv[i + 1];
        else if (!strcmp(argv[i], "--rate-kb")) rate_kb = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--verify-s")) verify_s = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--blocks")) nblocks = (size_t)atol(argv[i + 1]);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open_dev(dev), rfd = ref ? open_dev(ref) : -1;
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) == 0 && bytes / BLOCK < nblocks)
        nblocks = bytes / BLOCK;
    if (rfd >= 0 && ioctl(rfd, BLKGETSIZE64, &bytes) == 0 && bytes / BLOCK < nblocks)
        nblocks = bytes / BLOCK;
    if (nblocks == 0 || verify_s < 1) {
        printf("NOVACRON-DISK-ERROR no blocks to write\n");
        return 1;
    }
    int ur = open("/dev/urandom", O_RDONLY);
    if (ur < 0 || read(ur, &boot_id, sizeof boot_id) != sizeof boot_id)
        boot_id = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (ur >= 0)
        close(ur);
    gens = calloc(nblocks, sizeof *gens);
    uint64_t *buf;
    if (!gens || posix_memalign((void **)&buf, BLOCK, BLOCK) != 0)
        return 2;
    printf("NOVACRON-DISK-START boot=%016llx dev=%s ref=%s blocks=%zu rate_kb=%ld verify_s=%ld\n",
           (unsigned long long)boot_id, dev, ref ? ref : "-", nblocks, rate_kb, verify_s);
    /* blocks per 20 ms tick, carried as a fraction so low rates still write */
    double per_tick = rate_kb * 1024.0 / BLOCK / (1e9 / TICK_NS), owed = 0;
    uint64_t gen = 0, writes = 0, passes = 0, seq = 0, rng = boot_id | 1;
    size_t total_bad = 0;
    double next_hb = now_s() + 1, next_verify = now_s() + verify_s;
    struct timespec tick = {0, TICK_NS};
    for (;;) {
        for (owed += per_tick; owed >= 1; owed -= 1) {
            rng = mix64(rng + 0x9e3779b97f4a7c15ULL);
            uint64_t idx = rng % nblocks;
            fill(buf, idx, ++gen);
            if ((rfd >= 0 && !write_block(rfd, buf, idx)) || !write_block(fd, buf, idx)) {
                printf("NOVACRON-DISK-ERROR write block %llu: %s\n", (unsigned long long)idx, strerror(errno));
                continue; /* the block keeps its old generation: verify shows the damage */
            }
            gens[idx] = gen;
            writes++;
        }
        double t = now_s();
        if (t >= next_verify) {
            size_t written = 0, rwritten = 0;
            size_t bad = verify(fd, nblocks, &written);
            if (rfd >= 0)
                bad += verify(rfd, nblocks, &rwritten);
            total_bad += bad;
            passes++;
            printf("NOVACRON-DISK-VERIFY boot=%016llx pass=%llu written=%zu bad=%zu result=%s\n",
                   (unsigned long long)boot_id, (unsigned long long)passes, written, bad, bad ? "FAIL" : "ok");
            next_verify = now_s() + verify_s;
        }
        if (t >= next_hb) {
            printf("NOVACRON-DISK-HB boot=%016llx seq=%llu writes=%llu passes=%llu bad=%zu\n",
                   (unsigned long long)boot_id, (unsigned long long)++seq, (unsigned long long)writes,
                   (unsigned long long)passes, total_bad);
            next_hb += 1;
        }
        nanosleep(&tick, NULL);
    }
}
