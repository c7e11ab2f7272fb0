/* The soft-dirty reader (native/nc_pagemap.h) on a kernel that has soft-dirty:
 * run by the test guest's init when the kernel command line says
 * novacron.softdirty_check=1. A child maps a shared memfd (tmpfs, as QEMU maps
 * a RAM file), writes every page, then, after the parent cleared the child's
 * soft-dirty bits, writes pages 3, 17 and 40 only. The parent reads the child's
 * page tables with the reader and prints one line:
 *   NOVACRON-SOFTDIRTY ok soft_dirty=3,17,40 resident=64
 *   NOVACRON-SOFTDIRTY fail <what differed>   (or: unsupported <why>)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "nc_pagemap.h"

#define NPAGES 64
#define PAGE 4096

static const int WRITTEN[] = {3, 17, 40};

static void list(const unsigned char *bm, char *out, size_t cap) {
    size_t n = 0;
    out[0] = 0;
    for (int i = 0; i < NPAGES && n + 8 < cap; i++)
        if (bm[i >> 3] & (1u << (i & 7))) n += (size_t)snprintf(out + n, cap - n, n ? ",%d" : "%d", i);
}

static int count(const unsigned char *bm) {
    int c = 0;
    for (int i = 0; i < NPAGES; i++) c += (bm[i >> 3] >> (i & 7)) & 1;
    return c;
}

static int read_bits(pid_t pid, uintptr_t addr, unsigned bit, unsigned char *bm) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/pagemap", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    memset(bm, 0, NPAGES / 8);
    int rc = nc_pagemap_bits(fd, addr, NPAGES, bit, bm, 0);
    close(fd);
    return rc;
}

int main(void) {
    int fd = memfd_create("novacron-softdirty-check", 0);
    if (fd < 0 || ftruncate(fd, NPAGES * PAGE) != 0) {
        printf("NOVACRON-SOFTDIRTY fail memfd: %s\n", strerror(errno));
        return 1;
    }
    volatile unsigned char *mem = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        printf("NOVACRON-SOFTDIRTY fail mmap: %s\n", strerror(errno));
        return 1;
    }
    int to_child[2], to_parent[2];
    if (pipe(to_child) || pipe(to_parent)) return 1;
    pid_t child = fork();
    if (child == 0) { /* the "QEMU": writes guest RAM through its own shared mapping */
        char c;
        for (int i = 0; i < NPAGES; i++) mem[i * PAGE] = 1;
        if (write(to_parent[1], "r", 1) != 1 || read(to_child[0], &c, 1) != 1) _exit(1);
        for (size_t i = 0; i < sizeof WRITTEN / sizeof *WRITTEN; i++) mem[WRITTEN[i] * PAGE + 8] = 2;
        if (write(to_parent[1], "w", 1) != 1) _exit(1);
        read(to_child[0], &c, 1); /* stay alive until the parent has read */
        _exit(0);
    }
    char c;
    unsigned char sd[NPAGES / 8], res[NPAGES / 8], before[NPAGES / 8];
    char got[256], want[64] = "3,17,40", pre[256];
    int rc = read(to_parent[0], &c, 1) == 1 ? 0 : -EIO;
    if (!rc) rc = nc_clear_soft_dirty(child);
    if (!rc) rc = read_bits(child, (uintptr_t)mem, NC_PM_SOFT_DIRTY, before);
    if (!rc && write(to_child[1], "g", 1) != 1) rc = -EIO;
    if (!rc && read(to_parent[0], &c, 1) != 1) rc = -EIO;
    if (!rc) rc = read_bits(child, (uintptr_t)mem, NC_PM_SOFT_DIRTY, sd);
    if (!rc) rc = read_bits(child, (uintptr_t)mem, NC_PM_PRESENT, res);
    if (write(to_child[1], "q", 1) != 1) kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    if (rc) {
        printf("NOVACRON-SOFTDIRTY %s %s\n", rc == -EINVAL || rc == -ENOENT ? "unsupported" : "fail",
               strerror(-rc));
        return 1;
    }
    list(sd, got, sizeof got);
    list(before, pre, sizeof pre);
    int ok = strcmp(got, want) == 0 && count(before) == 0 && count(res) == NPAGES;
    printf("NOVACRON-SOFTDIRTY %s soft_dirty=%s resident=%d after_clear=%s\n", ok ? "ok" : "fail",
           got, count(res), pre[0] ? pre : "none");
    return ok ? 0 : 1;
}
