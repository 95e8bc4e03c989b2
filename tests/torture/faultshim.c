/*
 * faultshim: make chosen file operations fail while an arm file exists.
 *
 * Loaded with LD_PRELOAD. While the file named by FAULT_ARMFILE exists,
 * every FAULT_OP (write, sync or trunc) on a file whose path ends with
 * FAULT_SUFFIX (e.g. "-wal") fails with errno FAULT_ERRNO (5 = EIO,
 * 28 = ENOSPC). Anything else passes through.
 *
 * Build: cc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_ftruncate)(int, off_t);
static int ready = 0;

static void init(void) {
    if (ready) return;
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_write = dlsym(RTLD_NEXT, "write");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    ready = 1;
}

/* True if `op` on fd must fail now. */
static int fault(int fd, const char *op) {
    const char *want = getenv("FAULT_OP");
    const char *suffix = getenv("FAULT_SUFFIX");
    const char *arm = getenv("FAULT_ARMFILE");
    if (!want || !suffix || !arm || strcmp(want, op) != 0) return 0;
    if (access(arm, F_OK) != 0) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    size_t ls = strlen(suffix);
    if ((size_t)n < ls || strcmp(path + n - ls, suffix) != 0) return 0;
    const char *e = getenv("FAULT_ERRNO");
    errno = e ? atoi(e) : EIO;
    return 1;
}

ssize_t pwrite64(int fd, const void *b, size_t n, off64_t o) { init(); if (fault(fd, "write")) return -1; return real_pwrite64(fd, b, n, o); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { init(); if (fault(fd, "write")) return -1; return real_pwrite(fd, b, n, o); }
ssize_t write(int fd, const void *b, size_t n) { init(); if (fd > 2 && fault(fd, "write")) return -1; return real_write(fd, b, n); }
int fsync(int fd) { init(); if (fault(fd, "sync")) return -1; return real_fsync(fd); }
int fdatasync(int fd) { init(); if (fault(fd, "sync")) return -1; return real_fdatasync(fd); }
int ftruncate64(int fd, off64_t s) { init(); if (fault(fd, "trunc")) return -1; return real_ftruncate64(fd, s); }
int ftruncate(int fd, off_t s) { init(); if (fault(fd, "trunc")) return -1; return real_ftruncate(fd, s); }
