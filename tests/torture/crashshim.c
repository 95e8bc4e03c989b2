/*
 * crashshim: simulate a power cut for the files under one directory.
 *
 * Loaded with LD_PRELOAD into a child process. It keeps an undo log of
 * every write (and truncate) to a file under CRASH_DIR that has not been
 * fsync'ed yet. At the trigger, either the CRASH_AT_SYNC-th fsync or the
 * CRASH_AT_WRITE-th write, it reverts the unsynced writes, newest first,
 * keeping a random CRASH_KEEP_PCT percent of them (a disk that flushed some
 * of its cache, in any order), and calls _exit(99) without any cleanup.
 *
 * Build: cc -shared -fPIC -O2 -o crashshim.so crashshim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

struct undo {
    char path[PATH_MAX];
    off_t offset;
    size_t len;      /* bytes of old content saved in data */
    char *data;
    off_t old_size;  /* file size before the write */
    struct undo *prev;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct undo *newest = NULL;
static long writes = 0, syncs = 0;
static long at_write = -1, at_sync = -1, keep_pct = 0;
static char dir[PATH_MAX];
static size_t dir_len = 0;
static int ready = 0;
static uint64_t rng = 88172645463325252ULL;

static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_ftruncate)(int, off_t);

static void init(void) {
    if (ready) return;
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_write = dlsym(RTLD_NEXT, "write");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    const char *d = getenv("CRASH_DIR");
    if (d) {
        strncpy(dir, d, sizeof dir - 1);
        dir_len = strlen(dir);
    }
    const char *s;
    if ((s = getenv("CRASH_AT_WRITE"))) at_write = atol(s);
    if ((s = getenv("CRASH_AT_SYNC"))) at_sync = atol(s);
    if ((s = getenv("CRASH_KEEP_PCT"))) keep_pct = atol(s);
    if ((s = getenv("CRASH_SEED"))) rng ^= (uint64_t)atoll(s) * 2654435761ULL;
    ready = 1;
}

static int watched(int fd, char *out) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n <= 0) return 0;
    out[n] = 0;
    return dir_len > 0 && strncmp(out, dir, dir_len) == 0;
}

static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void crash(void) {
    /* Revert unsynced changes, newest first, keeping some at random. */
    for (struct undo *u = newest; u; u = u->prev) {
        if ((long)(next_rand() % 100) < keep_pct) continue;
        int fd = open(u->path, O_WRONLY);
        if (fd < 0) continue;
        if (u->len > 0) real_pwrite64(fd, u->data, u->len, u->offset);
        struct stat st;
        if (fstat(fd, &st) == 0 && st.st_size > u->old_size) real_ftruncate64(fd, u->old_size);
        close(fd);
    }
    _exit(99);
}

/* Records the old content of [offset, offset+len) of fd's file. */
static void record(int fd, const char *path, off_t offset, size_t len) {
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    struct undo *u = calloc(1, sizeof *u);
    if (!u) return;
    strncpy(u->path, path, PATH_MAX - 1);
    u->offset = offset;
    u->old_size = st.st_size;
    size_t have = 0;
    if (offset < st.st_size) {
        have = (size_t)(st.st_size - offset) < len ? (size_t)(st.st_size - offset) : len;
        u->data = malloc(have);
        if (u->data) {
            int rfd = open(path, O_RDONLY);
            if (rfd >= 0) {
                ssize_t got = pread(rfd, u->data, have, offset);
                have = got > 0 ? (size_t)got : 0;
                close(rfd);
            } else {
                have = 0;
            }
        } else {
            have = 0;
        }
    }
    u->len = have;
    u->prev = newest;
    newest = u;
}

static void before_write(int fd, off_t offset, size_t len) {
    char path[PATH_MAX];
    if (!watched(fd, path)) return;
    pthread_mutex_lock(&lock);
    writes++;
    if (at_write >= 0 && writes >= at_write) crash();
    record(fd, path, offset, len);
    pthread_mutex_unlock(&lock);
}

static void forget(const char *path) {
    struct undo **link = &newest;
    while (*link) {
        struct undo *u = *link;
        if (strcmp(u->path, path) == 0) {
            *link = u->prev;
            free(u->data);
            free(u);
        } else {
            link = &u->prev;
        }
    }
}

static void on_sync(int fd) {
    char path[PATH_MAX];
    if (!watched(fd, path)) return;
    pthread_mutex_lock(&lock);
    syncs++;
    if (at_sync >= 0 && syncs >= at_sync) crash();
    forget(path);
    pthread_mutex_unlock(&lock);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    init();
    before_write(fd, off, n);
    return real_pwrite64(fd, buf, n, off);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    init();
    before_write(fd, off, n);
    return real_pwrite(fd, buf, n, off);
}

ssize_t write(int fd, const void *buf, size_t n) {
    init();
    char path[PATH_MAX];
    if (ready && watched(fd, path)) {
        off_t pos = lseek(fd, 0, SEEK_CUR);
        if (pos >= 0) before_write(fd, pos, n);
    }
    return real_write(fd, buf, n);
}

int fsync(int fd) {
    init();
    int r = real_fsync(fd);
    if (r == 0) on_sync(fd);
    return r;
}

int fdatasync(int fd) {
    init();
    int r = real_fdatasync(fd);
    if (r == 0) on_sync(fd);
    return r;
}

static void before_truncate(int fd, off_t size) {
    char path[PATH_MAX];
    if (!watched(fd, path)) return;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= size) return;
    pthread_mutex_lock(&lock);
    record(fd, path, size, (size_t)(st.st_size - size));
    pthread_mutex_unlock(&lock);
}

int ftruncate64(int fd, off64_t size) {
    init();
    before_truncate(fd, size);
    return real_ftruncate64(fd, size);
}

int ftruncate(int fd, off_t size) {
    init();
    before_truncate(fd, size);
    return real_ftruncate(fd, size);
}
