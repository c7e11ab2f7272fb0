/* Another process's page tables through /proc/PID/pagemap, and its soft-dirty
 * bits: the reader behind native/softdirty.py (GuestRamWatch). Plain C with no
 * Python, so the test guest's soft-dirty check (agent/guest/softdirty_check.c)
 * compiles this very code and runs it on a kernel that has soft-dirty. */
#ifndef NC_PAGEMAP_H
#define NC_PAGEMAP_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define NC_PM_SOFT_DIRTY 55
#define NC_PM_SWAP 62 /* swap-format entry: e.g. a page the kernel is migrating */
#define NC_PM_PRESENT 63

/* For the npages pages from address addr in the process whose pagemap is open
 * at fd: set bit (first + i) of the little-endian bitmap out when entry i has
 * bit `bit` or the swap bit. Other bits of out are left as they are.
 * Returns 0, or -errno. */
static int nc_pagemap_bits(int fd, uint64_t addr, uint64_t npages, unsigned bit,
                           unsigned char *out, uint64_t first) {
    uint64_t buf[4096];
    const uint64_t want = (1ULL << bit) | (1ULL << NC_PM_SWAP);
    uint64_t done = 0;
    while (done < npages) { /* bounded: each pass consumes > 0 entries or returns */
        uint64_t n = npages - done;
        if (n > 4096) n = 4096;
        ssize_t got = pread(fd, buf, (size_t)(n * 8), (off_t)(((addr >> 12) + done) * 8));
        if (got < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (got == 0 || got % 8) return -EIO;
        uint64_t m = (uint64_t)got / 8;
        for (uint64_t i = 0; i < m; i++) {
            if (buf[i] & want) {
                uint64_t p = first + done + i;
                out[p >> 3] |= (unsigned char)(1u << (p & 7));
            }
        }
        done += m;
    }
    return 0;
}

/* Clear the soft-dirty bits of every mapping of process pid. Returns 0, or -errno. */
static int nc_clear_soft_dirty(int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/clear_refs", pid);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    ssize_t w = write(fd, "4", 1);
    int err = w == 1 ? 0 : (w < 0 ? -errno : -EIO);
    close(fd);
    return err;
}

#endif
