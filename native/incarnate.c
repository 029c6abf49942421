/*
 * pytest-incarnate native core.
 *
 * Two sides:
 *   parent side (normal code): pipes, clone, id maps, the go byte, reading the error pipe;
 *   child side (only raw system calls, see child_*): wait for go, run the ordered ops,
 *   become the pid-1 init if asked, and exec the payload or return into it.
 *
 * The child never allocates, never formats text and never calls stdio or strerror: every
 * string it uses was prepared by the caller.  Failures travel to the parent as a fixed
 * record (step, errno, op index) over a close-on-exec pipe; EOF without a record means the
 * payload was reached (exec succeeded, or in enter mode the payload closed its end).
 */
#define _GNU_SOURCE
#include "incarnate.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef MOVE_MOUNT_T_EMPTY_PATH
#define MOVE_MOUNT_T_EMPTY_PATH 0x00000040
#endif
#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#define KSIGSET_SIZE 8   /* the kernel's sigset size on Linux */
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

struct inc_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

struct inc_mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

/* What the child writes into the error pipe. */
struct inc_record {
    int32_t step;
    int32_t err;
    int32_t op_index;
    int32_t pad;
};

/* Child context: file descriptors the child side needs. */
struct inc_child {
    int sync_r;      /* go byte from the parent */
    int err_w;       /* error records, close-on-exec */
    int status_w;    /* init -> monitor/parent: the payload's wait status */
    int hold_fd;     /* INC_OP_HOLD's fd, kept by the init; -1 if none */
    int shared_vm;   /* the init shares the monitor's memory (enter mode, CLONE_VM) */
    int dumpable;    /* shared_vm: the memory's dumpable flag before the payload's fork */
    sigset_t oldmask;
};

/* Raw system calls that leave errno alone.  An init started with CLONE_VM shares the
 * monitor's memory, thread-local errno included, and keeps running after the monitor has
 * gone back to its own work: from then on it must not write errno. */
#if defined(__x86_64__)
#define INC_RAW_SYSCALLS 1
static long raw_sys(long n, long a1, long a2, long a3, long a4)
{
    long ret;
    register long r10 __asm__("r10") = a4;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10) : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
#define INC_RAW_SYSCALLS 1
static long raw_sys(long n, long a1, long a2, long a3, long a4)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a1;
    register long x1 __asm__("x1") = a2;
    register long x2 __asm__("x2") = a3;
    register long x3 __asm__("x3") = a4;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory", "cc");
    return x0;
}
#else
#define INC_RAW_SYSCALLS 0
#endif
/* AddressSanitizer keeps per-stack state that a jump between stacks confuses. */
#if defined(__SANITIZE_ADDRESS__)
#undef INC_RAW_SYSCALLS
#define INC_RAW_SYSCALLS 0
#endif

/* ------------------------------------------------------------------ child side ---- */
/* Only async-signal-safe code below, up to the parent side marker. */

static size_t c_strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* Returns 0, or -1 with errno. */
static int c_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static void child_fail(const struct inc_child *cx, int step, int err, int op_index)
{
    struct inc_record rec;
    rec.step = step;
    rec.err = err ? err : EINVAL;
    rec.op_index = op_index;
    rec.pad = 0;
    c_write_all(cx->err_w, &rec, sizeof rec);
    _exit(127);
}

/* Open path (absolute, relative to the current root) component by component without
 * following any symlink; with create, make missing directories, and make the last
 * component a directory (want_dir) or an empty file.  Returns an O_PATH fd or -1. */
static int child_resolve(const char *path, int create, int want_dir)
{
    char buf[4096];
    size_t len = c_strlen(path);
    if (len >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    if (len == 0 || path[0] != '/') {
        errno = EINVAL;
        return -1;
    }
    memcpy(buf, path, len + 1);
    int dirfd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return -1;
    char *p = buf;
    while (*p == '/')
        p++;
    if (*p == '\0')
        return dirfd;
    for (;;) {
        char *comp = p;
        while (*p && *p != '/')
            p++;
        int last = 1;
        if (*p == '/') {
            *p++ = '\0';
            while (*p == '/')
                p++;
            last = (*p == '\0');
        }
        int flags = O_PATH | O_NOFOLLOW | O_CLOEXEC | (last ? 0 : O_DIRECTORY);
        int fd = openat(dirfd, comp, flags);
        if (fd < 0 && errno == ENOENT && create) {
            int r;
            if (!last || want_dir) {
                r = mkdirat(dirfd, comp, 0755);
            } else {
                r = openat(dirfd, comp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
                if (r >= 0)
                    r = close(r);
            }
            if (r < 0 && errno != EEXIST) {
                int e = errno;
                close(dirfd);
                errno = e;
                return -1;
            }
            fd = openat(dirfd, comp, flags);
        }
        int e = errno;
        if (fd < 0 && e == ENOTDIR) {
            /* A symlink where a directory was needed is refused as one (ELOOP). */
            struct stat lst;
            if (fstatat(dirfd, comp, &lst, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(lst.st_mode))
                e = ELOOP;
        }
        close(dirfd);
        if (fd < 0) {
            errno = e;
            return -1;
        }
        struct stat st;
        if (fstat(fd, &st) < 0) {
            e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        if (S_ISLNK(st.st_mode)) {
            close(fd);
            errno = ELOOP;
            return -1;
        }
        if (last)
            return fd;
        dirfd = fd;
    }
}

static int child_ensure(const char *path, int create, int want_dir)
{
    int fd = child_resolve(path, create, want_dir);
    if (fd < 0)
        return -1;
    close(fd);
    return 0;
}

/* Mount flags a remount must keep: in a user namespace they are locked. */
static unsigned long child_locked_flags(const char *path)
{
    struct statfs sf;
    unsigned long f = 0;
    if (statfs(path, &sf) < 0)
        return 0;
    if (sf.f_flags & ST_NOSUID)
        f |= MS_NOSUID;
    if (sf.f_flags & ST_NODEV)
        f |= MS_NODEV;
    if (sf.f_flags & ST_NOEXEC)
        f |= MS_NOEXEC;
    if (sf.f_flags & ST_NOATIME)
        f |= MS_NOATIME;
    if (sf.f_flags & ST_NODIRATIME)
        f |= MS_NODIRATIME;
    if (sf.f_flags & ST_RELATIME)
        f |= MS_RELATIME;
    return f;
}

/* Read-only by remount (kernels without mount_setattr): the top mount only. */
static int child_remount_ro_top(const char *path)
{
    return mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | child_locked_flags(path), NULL);
}

static int child_bind(const struct inc_op *op)
{
    int rec = (op->flags & INC_BIND_REC) ? AT_RECURSIVE : 0;
    /* The source is walked without following symlinks (the parent resolved it already: a
     * symlink found now was swapped in since, and is refused with ELOOP). */
    int src = child_resolve(op->a, 0, 0);
    if (src < 0)
        return -1;
    int tree = (int)syscall(SYS_open_tree, src, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | rec);
    if (tree < 0) {
        int e = errno;
        close(src);
        errno = e;
    } else {
        close(src);
    }
    if (tree < 0 && errno == ENOSYS) {
        /* Old kernel: classic bind, read-only applied to the top mount only. */
        struct stat st;
        if (stat(op->a, &st) < 0)
            return -1;
        if (child_ensure(op->b, op->flags & INC_BIND_CREATE, S_ISDIR(st.st_mode)) < 0)
            return -1;
        unsigned long f = MS_BIND | ((op->flags & INC_BIND_REC) ? MS_REC : 0);
        if (mount(op->a, op->b, NULL, f, NULL) < 0)
            return -1;
        if (op->flags & INC_BIND_RO)
            return child_remount_ro_top(op->b);
        return 0;
    }
    if (tree < 0)
        return -1;
    int e, ro_late = 0;
    struct stat st;
    if (fstat(tree, &st) < 0)
        goto fail;
    if (op->flags & INC_BIND_RO) {
        struct inc_mount_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.attr_set = MOUNT_ATTR_RDONLY;
        if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | rec, &attr, sizeof attr) < 0) {
            if (errno != ENOSYS)
                goto fail;
            ro_late = 1;   /* Linux 5.2 to 5.11: open_tree without mount_setattr */
        }
    }
    int target = child_resolve(op->b, op->flags & INC_BIND_CREATE, S_ISDIR(st.st_mode));
    if (target < 0)
        goto fail;
    if (syscall(SYS_move_mount, tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0) {
        e = errno;
        close(target);
        close(tree);
        errno = e;
        return -1;
    }
    close(target);
    close(tree);
    if (ro_late)
        return child_remount_ro_top(op->b);
    return 0;
fail:
    e = errno;
    close(tree);
    errno = e;
    return -1;
}

static int child_remount_ro(const char *path)
{
    struct inc_mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = MOUNT_ATTR_RDONLY;
    if (syscall(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &attr, sizeof attr) == 0)
        return 0;
    if (errno != ENOSYS)
        return -1;
    return child_remount_ro_top(path);
}

static int child_loopback(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_name[0] = 'l';
    ifr.ifr_name[1] = 'o';
    int r = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (r == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        r = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int e = errno;
    close(s);
    errno = e;
    return r;
}

static int child_stage(const char *base)
{
    if (mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
        return -1;
    if (chdir(base) < 0)
        return -1;
    if (mkdir("newroot", 0755) < 0 || mkdir("oldroot", 0755) < 0)
        return -1;
    if (syscall(SYS_pivot_root, ".", "oldroot") < 0)
        return -1;
    return chdir("/");
}

static int child_pivot(const char *newroot)
{
    if (chdir(newroot) < 0)
        return -1;
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        return -1;
    if (umount2(".", MNT_DETACH) < 0)
        return -1;
    return chdir("/");
}

/* Tell the parent something (a record that is not an error).  A record that cannot be
 * written is a failure of the op (INC_STEP_RECORD): the parent must not wait for a request
 * that never comes, nor take the child's silence for success. */
static void child_note(const struct inc_child *cx, int step, int index, int pad)
{
    struct inc_record rec = {step, 0, index, pad};
    if (c_write_all(cx->err_w, &rec, sizeof rec) < 0)
        child_fail(cx, INC_STEP_RECORD, errno, index);
}

static int child_read_go(const struct inc_child *cx);

/* A request: the record, then wait for the parent's answer (the go byte). */
static void child_request(const struct inc_child *cx, int step, int index, int pad)
{
    child_note(cx, step, index, pad);
    if (child_read_go(cx) < 0)
        _exit(127);   /* the parent gave up (it reports why) or died */
}

static int child_read_go(const struct inc_child *cx)
{
    char go = 0;
    ssize_t n;
    do {
        n = read(cx->sync_r, &go, 1);
    } while (n < 0 && errno == EINTR);
    return n == 1 && go == 'g' ? 0 : -1;
}

/* Write a whole small file (a /proc map), failing on a short write.  Syscalls only: the
 * child uses it for its own maps, the parent for the child's. */
static int child_write_file(const char *path, const char *data)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = c_strlen(data);
    ssize_t w = write(fd, data, len);
    int e = errno;
    close(fd);
    if (w != (ssize_t)len) {
        errno = w < 0 ? e : EIO;
        return -1;
    }
    return 0;
}

static int child_unshare(struct inc_child *cx, const struct inc_op *op, int index)
{
    int flags = op->ival;
    if (unshare(flags) < 0)
        return -1;
    if ((flags & CLONE_NEWUSER) && (op->flags & INC_UNSHARE_SELF_MAP)) {
        /* A nested user namespace (entered after the mounts, which the kernel then locks):
         * the child maps its own single id (the only map it may write), prepared by the
         * parent as text in a (uid) and b (gid). */
        if (child_write_file("/proc/self/setgroups", "deny") < 0 && errno != ENOENT)
            return -1;
        if (child_write_file("/proc/self/uid_map", op->a) < 0 || child_write_file("/proc/self/gid_map", op->b) < 0)
            return -1;
        return 0;
    }
    if (flags & CLONE_NEWUSER)
        child_request(cx, INC_STEP_MAPS_REQUEST, index, 0);
    return 0;
}

static int child_hold(struct inc_child *cx, const struct inc_op *op, int index)
{
    int fd = open(op->a, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fd != op->ival) {
        if (dup3(fd, op->ival, O_CLOEXEC) < 0) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        close(fd);
    }
    cx->hold_fd = op->ival;
    /* Pause until the parent has taken its duplicate (pidfd_getfd): a payload that ends at
     * once must not take the init, and the fd, with it before that. */
    child_request(cx, INC_STEP_HOLD_READY, index, op->ival);
    return 0;
}

static int child_op(struct inc_child *cx, const struct inc_op *op, int index)
{
    switch (op->kind) {
    case INC_OP_UNSHARE:
        return child_unshare(cx, op, index);
    case INC_OP_RLIMIT: {
        struct rlimit rl = {(rlim_t)op->v1, (rlim_t)op->v2};
        return setrlimit(op->ival, &rl);
    }
    case INC_OP_AFFINITY: {
        uint64_t mask[2] = {op->v1, op->v2};
        return (int)syscall(SYS_sched_setaffinity, 0, sizeof mask, mask);
    }
    case INC_OP_HOLD:
        return child_hold(cx, op, index);
    case INC_OP_SYMLINK:
        if (symlink(op->a, op->b) < 0 && errno != EEXIST)
            return -1;
        return 0;
    case INC_OP_DEVPTS:
        if (child_ensure(op->b, 1, 1) < 0)
            return -1;
        return mount("devpts", op->b, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
    case INC_OP_HOSTNAME:
        return sethostname(op->a, c_strlen(op->a));
    case INC_OP_LOOPBACK:
        return child_loopback();
    case INC_OP_RPRIVATE:
        return mount(NULL, op->a, NULL, MS_REC | MS_PRIVATE, NULL);
    case INC_OP_TMPFS:
        if (child_ensure(op->b, op->flags & INC_BIND_CREATE, 1) < 0)
            return -1;
        return mount("tmpfs", op->b, "tmpfs", MS_NOSUID | MS_NODEV, op->c);
    case INC_OP_BIND:
        return child_bind(op);
    case INC_OP_OVERLAY:
        if (child_ensure(op->b, op->flags & INC_BIND_CREATE, 1) < 0)
            return -1;
        return mount("overlay", op->b, "overlay", 0, op->c);
    case INC_OP_PROC:
        if (child_ensure(op->b, op->flags & INC_BIND_CREATE, 1) < 0)
            return -1;
        return mount("proc", op->b, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    case INC_OP_STAGE:
        return child_stage(op->a);
    case INC_OP_PIVOT:
        return child_pivot(op->a);
    case INC_OP_MKDIR:
        if (mkdir(op->a, (mode_t)op->ival) < 0) {
            if (errno != EEXIST)
                return -1;
            return 0;
        }
        return chmod(op->a, (mode_t)op->ival);   /* the mode asked for, whatever the umask */
    case INC_OP_CHDIR:
        return chdir(op->a);
    case INC_OP_UMASK:
        umask((mode_t)op->ival);
        return 0;
    case INC_OP_NO_NEW_PRIVS:
        return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    case INC_OP_SETSID:
        return setsid() < 0 ? -1 : 0;
    case INC_OP_DROP_PRIVS:
        if ((op->flags & INC_DROP_SETGROUPS) && syscall(SYS_setgroups, 0, NULL) < 0)
            return -1;
        if (syscall(SYS_setresgid, op->gid, op->gid, op->gid) < 0)
            return -1;
        return (int)syscall(SYS_setresuid, op->uid, op->uid, op->uid);
    case INC_OP_REMOUNT_RO:
        return child_remount_ro(op->a);
    default:
        errno = EINVAL;
        return -1;
    }
}

static void close_range_or_loop(unsigned lo, unsigned hi, int raw)
{
#if INC_RAW_SYSCALLS
    if (raw) {
        if (raw_sys(SYS_close_range, lo, hi, 0, 0) == 0)
            return;
        for (unsigned fd = lo; fd <= hi && fd < 65536; fd++)
            raw_sys(SYS_close, (long)fd, 0, 0, 0);
        return;
    }
#else
    (void)raw;
#endif
    if (syscall(SYS_close_range, lo, hi, 0U) == 0)
        return;
    for (unsigned fd = lo; fd <= hi && fd < 65536; fd++)
        close((int)fd);
}

static void child_init_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGCHLD);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    sigaddset(set, SIGQUIT);
    sigaddset(set, SIGUSR1);
    sigaddset(set, SIGUSR2);
}

/* The pid-1 init: reap every child, forward signals to the payload, and when the payload
 * ends, report its raw wait status and exit (the kernel then kills what is left). */
#if INC_RAW_SYSCALLS
/* The init loop of an init sharing the monitor's memory: raw calls only (see raw_sys). */
static void child_init_loop_raw(const struct inc_child *cx, pid_t payload)
{
    sigset_t set;
    child_init_signals(&set);
    for (;;) {
        siginfo_t si;
        long sig = raw_sys(SYS_rt_sigtimedwait, (long)&set, (long)&si, 0, KSIGSET_SIZE);
        if (sig < 0)
            continue;   /* -EINTR */
        if (sig != SIGCHLD) {
            raw_sys(SYS_kill, payload, sig, 0, 0);
            continue;
        }
        for (;;) {
            int st = 0;
            long r = raw_sys(SYS_wait4, -1, (long)&st, WNOHANG, 0);
            if (r <= 0)
                break;
            if (r == payload) {
                int32_t rec = st;
                raw_sys(SYS_write, cx->status_w, (long)&rec, sizeof rec, 0);
                raw_sys(SYS_exit_group, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), 0, 0, 0);
            }
        }
    }
}
#endif

static void child_init_loop(const struct inc_child *cx, pid_t payload)
{
#if INC_RAW_SYSCALLS
    if (cx->shared_vm) {
        /* No handler may run here any more (the caller's, Python's, on the shared memory):
         * every signal blocked; sigtimedwait takes the ones it waits for all the same. */
        uint64_t all = ~(uint64_t)0;
        raw_sys(SYS_rt_sigprocmask, SIG_SETMASK, (long)&all, 0, KSIGSET_SIZE);
        child_init_loop_raw(cx, payload);
    }
#endif
    sigset_t set;
    child_init_signals(&set);
    for (;;) {
        siginfo_t si;
        int sig = (int)syscall(SYS_rt_sigtimedwait, &set, &si, NULL, KSIGSET_SIZE);
        if (sig < 0)
            continue;   /* EINTR */
        if (sig != SIGCHLD) {
            kill(payload, sig);
            continue;
        }
        for (;;) {
            int st = 0;
            pid_t r = (pid_t)syscall(SYS_wait4, -1, &st, WNOHANG, NULL);
            if (r <= 0)
                break;
            if (r == payload) {
                int32_t rec = st;
                c_write_all(cx->status_w, &rec, sizeof rec);
                if (WIFEXITED(st))
                    _exit(WEXITSTATUS(st));
                _exit(128 + WTERMSIG(st));
            }
        }
    }
}

/* Close every fd but keep_a and keep_b (either may be -1). */
static void child_close_all_but(int keep_a, int keep_b, int raw)
{
    int lo = keep_a < keep_b ? keep_a : keep_b;
    int hi = keep_a < keep_b ? keep_b : keep_a;
    unsigned next = 0;
    int keep[2] = {lo, hi};
    for (int i = 0; i < 2; i++) {
        if (keep[i] < 0)
            continue;
        if ((unsigned)keep[i] > next)
            close_range_or_loop(next, (unsigned)keep[i] - 1, raw);
        next = (unsigned)keep[i] + 1;
    }
    close_range_or_loop(next, ~0U, raw);
}

static int child_close_fds(const struct inc_spec *spec)
{
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        for (int fd = 3; fd < 4096; fd++)
            fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    for (int i = 0; i < spec->n_keep_fds; i++)
        if (fcntl(spec->keep_fds[i], F_SETFD, 0) < 0)
            return -1;
    return 0;
}

static void child_exec(const struct inc_spec *spec, const struct inc_child *cx)
{
    if (spec->setsid_payload && setsid() < 0)
        child_fail(cx, INC_STEP_SETSID, errno, -1);
    int fds[3] = {spec->stdin_fd, spec->stdout_fd, spec->stderr_fd};
    /* A source that is itself 0, 1 or 2 is moved out of the way first, so that an
     * earlier dup2 cannot replace it (stdout=PIPE, stderr=1, say). */
    for (int i = 0; i < 3; i++) {
        if (fds[i] >= 0 && fds[i] < 3 && fds[i] != i && (fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3)) < 0)
            child_fail(cx, INC_STEP_STDIO, errno, -1);
    }
    for (int i = 0; i < 3; i++) {
        if (fds[i] < 0)
            continue;
        if ((fds[i] == i ? fcntl(i, F_SETFD, 0) : dup2(fds[i], i)) < 0)
            child_fail(cx, INC_STEP_STDIO, errno, -1);
    }
    if (spec->close_fds && child_close_fds(spec) < 0)
        child_fail(cx, INC_STEP_CLOSE_FDS, errno, -1);
    /* Python ignores SIGPIPE and SIGXFSZ; programs expect the defaults (as subprocess's
     * restore_signals does). */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGPIPE, &dfl, NULL);
    sigaction(SIGXFSZ, &dfl, NULL);
    execve(spec->exe, spec->argv, spec->envp);
    child_fail(cx, INC_STEP_EXEC, errno, -1);
}

static void payload_prepare(const struct inc_spec *spec, struct inc_child *cx)
{
    if (spec->die_with_parent)
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &cx->oldmask, NULL, KSIGSET_SIZE);
}

struct payload_arg {
    const struct inc_spec *spec;
    struct inc_child *cx;
};

/* The spawn-mode payload, started with CLONE_VM|CLONE_VFORK: it must only exec or _exit. */
static int payload_main(void *p)
{
    struct payload_arg *pa = p;
    payload_prepare(pa->spec, pa->cx);
    if (pa->cx->status_w >= 0)
        close(pa->cx->status_w);
    child_exec(pa->spec, pa->cx);
    _exit(127);
}

/* The payload's stack: memory of the init's own (a private copy after clone), in
 * static storage so that it costs nothing until touched. */
static char payload_stack[64 * 1024] __attribute__((aligned(16)));

static void *payload_stack_top(void)
{
    return payload_stack + sizeof payload_stack;
}

/* v1 cgroups: the child writes "0" (itself) into each controller's "tasks".  A write of
 * another process's pid takes the global cgroup_threadgroup_rwsem for writing and waits for
 * an RCU grace period (10-30 ms when writes are spaced, as between tests); a thread moving
 * itself does not. */
static void child_enter_cgroups(const struct inc_spec *spec, const struct inc_child *cx)
{
    for (int i = 0; i < spec->n_cgroup_procs_fds; i++) {
        if (write(spec->cgroup_procs_fds[i], "0", 1) != 1)
            child_fail(cx, INC_STEP_CGROUP, errno, i);
        close(spec->cgroup_procs_fds[i]);
    }
    /* Started with CLONE_VM (glibc's clone, which has no CLONE_INTO_CGROUP): into the v2
     * cgroup by itself as well. */
    if (cx->shared_vm && spec->cgroup_v2_procs_fd >= 0 && write(spec->cgroup_v2_procs_fd, "0", 1) != 1)
        child_fail(cx, INC_STEP_CGROUP, errno, spec->n_cgroup_procs_fds);
    /* The sandbox keeps no way to its cgroup directories: from the v2 directory's fd a
     * payload could walk up to the host's cgroup.procs (enter mode keeps the caller's fds). */
    if (spec->cgroup_dirfd >= 0)
        close(spec->cgroup_dirfd);
    if (spec->cgroup_v2_procs_fd >= 0)
        close(spec->cgroup_v2_procs_fd);
}

/* Runs in the cloned child.  Returns only in enter mode, in the payload. */
static void child_main(const struct inc_spec *spec, struct inc_child *cx, int enter)
{
    if (spec->die_with_parent && prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        child_fail(cx, INC_STEP_PDEATHSIG, errno, -1);
    /* The go byte.  EOF here means the parent died or gave up (after PDEATHSIG was set,
     * so this also closes the race where the parent died before prctl). */
    if (child_read_go(cx) < 0)
        _exit(127);
    child_enter_cgroups(spec, cx);

    for (int i = 0; i < spec->n_ops; i++) {
        const struct inc_op *op = &spec->ops[i];
        if (child_op(cx, op, i) == 0)
            continue;
        int e = errno;
        if (e != ENOENT || !(op->flags & INC_OP_OPTIONAL))
            child_fail(cx, INC_STEP_OP, e, i);
        /* An optional op whose source or target is gone (a host mount unmounted since the
         * plan): skipped, with the ops that depend on it (what is mounted under it).  A
         * failed mount op leaves nothing behind. */
        child_note(cx, INC_STEP_SKIPPED, i, 0);
        if (op->dependents > 0)
            i += op->dependents < spec->n_ops - 1 - i ? op->dependents : spec->n_ops - 1 - i;
    }
    if (spec->die_with_parent) {
        /* Changing ids or capabilities (drop-privileges) clears the parent-death signal:
         * arm it again, then check that the parent still holds its end of the sync pipe
         * (it keeps it until the payload runs). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
            child_fail(cx, INC_STEP_PDEATHSIG, errno, -1);
        struct pollfd pfd = {cx->sync_r, POLLIN, 0};
        if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLHUP | POLLIN | POLLERR)))
            _exit(127);
    }
    close(cx->sync_r);
    {
        /* A caller ignoring SIGCHLD would make the kernel reap the payload behind the
         * init's back. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        if (sigaction(SIGCHLD, &dfl, NULL) < 0)
            child_fail(cx, INC_STEP_SIGMASK, errno, -1);
    }

    if ((spec->ns_flags & INC_NS_PID) && spec->use_init) {
        sigset_t set;
        child_init_signals(&set);
        /* shared_vm: the monitor blocked every signal before the clone and kept its own mask
         * in cx->oldmask for the payload. */
        if (syscall(SYS_rt_sigprocmask, SIG_BLOCK, &set, cx->shared_vm ? NULL : &cx->oldmask, KSIGSET_SIZE) < 0)
            child_fail(cx, INC_STEP_SIGMASK, errno, -1);
        pid_t pid;
        if (spec->hold_init) {
            /* Holding: no payload of its own; it reaps what joins the sandbox (inc_join)
             * until it is killed.  Closing err_w tells the parent that the setup is done.
             * Sharing the caller's memory, it makes that memory non-dumpable first, as
             * before the payload's fork below: what joins must not reach the caller's
             * memory through the init (/proc/1/mem, ptrace). */
            if (cx->shared_vm) {
                cx->dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
                if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
                    child_fail(cx, INC_STEP_INIT_FORK, errno, -1);
            }
            child_close_all_but(cx->status_w, cx->hold_fd, cx->shared_vm);
            /* The copy that joins is the first process after the init: pid 2, the payload,
             * to which the init forwards the signals it gets (not its child: never reaped
             * here, so the init never exits for it). */
            child_init_loop(cx, 2);
        }
        if (!enter && spec->argv != NULL) {
            /* Spawn mode: the payload shares the init's memory until it execs (vfork
             * semantics, on a stack of its own), so the init does not copy the caller's
             * whole address space a second time.  The init is suspended meanwhile. */
            struct payload_arg pa = {spec, cx};
            pid = clone(payload_main, payload_stack_top(), CLONE_VM | CLONE_VFORK | SIGCHLD, &pa);
        } else {
            if (cx->shared_vm) {
                /* The init shares the monitor's memory, and the payload may ptrace its
                 * init (or write /proc/1/mem): the memory is made non-dumpable, so that
                 * the payload cannot reach the monitor through it.  The payload, a copy,
                 * gets the flag back. */
                cx->dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
                if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
                    child_fail(cx, INC_STEP_INIT_FORK, errno, -1);
            }
            pid = (pid_t)syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
            if (pid == 0 && cx->shared_vm && cx->dumpable == 1)
                prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
        }
        if (pid < 0)
            child_fail(cx, INC_STEP_INIT_FORK, errno, -1);
        if (pid > 0) {
            /* The init keeps only its status pipe: any other fd it held (a stdin pipe's
             * write end, the caller's result pipe) would keep the payload's peers from
             * seeing EOF.  Closing err_w gives the parent EOF once the payload runs. */
            child_close_all_but(cx->status_w, cx->hold_fd, cx->shared_vm);
            child_init_loop(cx, pid);
        }
        /* the payload, pid 2 (enter mode, or a trial) */
        payload_prepare(spec, cx);
    }
    if (cx->status_w >= 0)
        close(cx->status_w);

    if (!enter) {
        if (spec->argv == NULL)
            _exit(0);   /* a trial: the ops were the point */
        child_exec(spec, cx);
    }
    /* Enter mode: a session of its own, so that the caller's terminal is not its
     * controlling terminal (no TIOCSTI into it, no /dev/tty). */
    if (spec->setsid_payload && setsid() < 0)
        child_fail(cx, INC_STEP_SETSID, errno, -1);
    close(cx->err_w);
}

/* ----------------------------------------------------------------- parent side ---- */

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

struct inc_clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};

static pid_t parent_clone(const struct inc_spec *spec, int *pidfd, int *used3, int *into_cgroup)
{
    *used3 = 0;
    *into_cgroup = 0;
    if (spec->use_clone3 && spec->cgroup_dirfd >= 0) {
        /* cgroup v2: born in its cgroup, no pid to write afterwards. */
        struct inc_clone_args_v2 a;
        memset(&a, 0, sizeof a);
        a.flags = (uint64_t)(unsigned)spec->ns_flags | (spec->want_pidfd ? CLONE_PIDFD : 0) | CLONE_INTO_CGROUP;
        a.pidfd = (uint64_t)(uintptr_t)pidfd;
        a.exit_signal = SIGCHLD;
        a.cgroup = (uint64_t)spec->cgroup_dirfd;
        long r = syscall(SYS_clone3, &a, sizeof a);
        if (r >= 0) {
            *used3 = 1;
            *into_cgroup = 1;
            return (pid_t)r;
        }
        /* fall through: the caller writes cgroup.procs instead */
    }
    if (spec->use_clone3) {
        struct inc_clone_args a;
        memset(&a, 0, sizeof a);
        a.flags = (uint64_t)(unsigned)spec->ns_flags | (spec->want_pidfd ? CLONE_PIDFD : 0);
        a.pidfd = (uint64_t)(uintptr_t)pidfd;
        a.exit_signal = SIGCHLD;
        long r = syscall(SYS_clone3, &a, sizeof a);
        if (r >= 0) {
            *used3 = 1;
            return (pid_t)r;
        }
        /* ENOSYS: no clone3.  EPERM: a seccomp profile that predates it (older Docker,
         * runc, podman) refuses what it does not know; clone(2) then says the truth. */
        if (errno != ENOSYS && errno != EPERM)
            return -1;
    }
    unsigned long f = (unsigned long)(unsigned)spec->ns_flags | SIGCHLD | (spec->want_pidfd ? CLONE_PIDFD : 0);
    return (pid_t)syscall(SYS_clone, f, 0, spec->want_pidfd ? pidfd : NULL, NULL, 0);
}

static int parent_write_file(pid_t pid, const char *name, const char *data)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, name);
    return child_write_file(path, data);   /* the same whole-file write, syscalls only */
}

static int parent_id_maps(const struct inc_spec *spec, pid_t pid, struct inc_result *res)
{
    if (!(spec->ns_flags & INC_NS_USER))
        return 0;
    if (spec->setgroups_deny && parent_write_file(pid, "setgroups", "deny") < 0) {
        res->step = INC_STEP_SETGROUPS;
        return -1;
    }
    if (spec->uid_map && parent_write_file(pid, "uid_map", spec->uid_map) < 0) {
        res->step = INC_STEP_UID_MAP;
        return -1;
    }
    if (spec->gid_map && parent_write_file(pid, "gid_map", spec->gid_map) < 0) {
        res->step = INC_STEP_GID_MAP;
        return -1;
    }
    return 0;
}

/* Place the child in its cgroups (v1 controllers, or v2 without CLONE_INTO_CGROUP) while it
 * waits for the go byte: everything it runs is accounted from the start. */
static int parent_cgroups(const struct inc_spec *spec, pid_t pid, struct inc_result *res)
{
    /* v1: the child moves itself (see child_enter_cgroups).  v2 without CLONE_INTO_CGROUP:
     * the parent writes the pid. */
    if (res->into_cgroup || spec->cgroup_v2_procs_fd < 0)
        return 0;
    char buf[24];
    int len = snprintf(buf, sizeof buf, "%d", (int)pid);
    if (write(spec->cgroup_v2_procs_fd, buf, (size_t)len) != len) {
        res->step = INC_STEP_CGROUP;
        res->err = errno ? errno : EIO;
        res->op_index = spec->n_cgroup_procs_fds;
        return -1;
    }
    return 0;
}

/* Test-only (see inc_spec.test_stage): announce the stage to the test, which then kills
 * this process (or its parent, whose death signal ends it), and stay here until then.  The
 * parent side only: the child never runs it. */
static void parent_test_stage(const struct inc_spec *spec, int stage)
{
    static const char line[] = "after-clone\n";   /* the one stage here */
    if (spec->test_stage != stage || spec->test_stage_fd < 0)
        return;
    if (write(spec->test_stage_fd, line, sizeof line - 1) < 0)
        return;
    for (;;)
        pause();
}

static void close_if(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void parent_reap(pid_t pid)
{
    int st;
    kill(pid, SIGKILL);
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
}

/* Read one error record; returns 1 if one came, 0 on EOF, -1 on error. */
static int parent_read_record(int fd, struct inc_record *rec)
{
    size_t got = 0;
    while (got < sizeof *rec) {
        ssize_t n = read(fd, (char *)rec + got, sizeof *rec - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
        {
            if (got == 0)
                return 0;
            errno = EIO;   /* a torn record */
            return -1;
        }
        got += (size_t)n;
    }
    return 1;
}

/* Let the child go (the go byte), then read its next record: as parent_read_record, or -2
 * with res filled when the go byte could not be written.  A child that is alive waits for
 * the byte, so its error pipe must not be read then; one that is gone (EPIPE) may have
 * said why before it went, and its pipe is at EOF after that. */
static int parent_go(int sync_w, int err_r, struct inc_record *rec, struct inc_result *res)
{
    ssize_t w;
    do {
        w = write(sync_w, "g", 1);
    } while (w < 0 && errno == EINTR);
    if (w == 1)
        return parent_read_record(err_r, rec);
    int werr = w < 0 ? errno : EIO;
    if (werr == EPIPE) {
        int r = parent_read_record(err_r, rec);
        if (r != 0)
            return r;   /* its record (an error), or a torn one */
        res->step = INC_STEP_SYNC;   /* the child died before reading go, without a word */
        res->err = EPIPE;
        return -2;
    }
    res->step = INC_STEP_GO;
    res->err = werr;
    return -2;
}

/* Enter mode with CLONE_VM: the monitor (the caller of inc_enter, a fork of the Python
 * process) starts the init sharing its memory, on a stack of its own, so that its address
 * space is not copied for the init; only the payload is a copy.  The init forks the
 * payload, which jumps back into inc_enter's frame (in its copy of the monitor's memory)
 * and returns into Python there.  The monitor stays blocked in start() until the payload
 * runs, and the init keeps to raw system calls after that (see raw_sys). */
struct vm_ctx {
    const struct inc_spec *spec;
    struct inc_result *res;
    struct inc_child cx;
    int parent_ends[3];   /* the monitor's ends of the pipes, closed in the init */
    void *jb[5];          /* __builtin_setjmp in inc_enter */
    stack_t altstack;     /* the monitor's, which the kernel drops for a CLONE_VM child */
    char *stack_top;      /* the init's stack */
};
static struct vm_ctx vm_ctx;
/* The context the payload jumps back with: a global, read in the payload's copy of the
 * memory (locals of the frame that called __builtin_setjmp are not reliable there). */
static struct vm_ctx *vm_cur;

/* glibc's restartable-sequences area (2.35+), registered again in the payload: the kernel
 * drops the registration of a CLONE_VM child, and the payload is a fork of one. */
extern const ptrdiff_t __rseq_offset __attribute__((weak));
extern const unsigned int __rseq_size __attribute__((weak));
#if defined(__x86_64__)
#define INC_RSEQ_SIG 0x53053053
#elif defined(__aarch64__)
#define INC_RSEQ_SIG 0xd428bc00
#endif

/* In the payload, back from the jump: what a CLONE_VM child lost, given back. */
static void vm_payload_restore(const struct vm_ctx *v)
{
    if (!(v->altstack.ss_flags & SS_DISABLE))
        sigaltstack(&v->altstack, NULL);
#if defined(INC_RSEQ_SIG) && defined(SYS_rseq)
    if (&__rseq_size != NULL && __rseq_size > 0)
        syscall(SYS_rseq, (char *)__builtin_thread_pointer() + __rseq_offset, 32, 0, INC_RSEQ_SIG);
#endif
    /* The monitor was inside read() (asynchronous cancellation on) when it was copied. */
    pthread_setcanceltype(PTHREAD_CANCEL_DEFERRED, NULL);
    sigprocmask(SIG_SETMASK, &v->cx.oldmask, NULL);
}

/* In the payload, just landed from the jump: what a CLONE_VM child lost given back, and the
 * caller's result marked as the payload's (no pid, no descriptors: those are the parent's). */
static void vm_payload_landed(void)
{
    vm_payload_restore(vm_cur);
    struct inc_result *res = vm_cur->res;
    res->step = 0;
    res->pid = -1;
    res->pidfd = -1;
    res->status_fd = -1;
    res->hold_fd = -1;
}

/* Shadow stacks (CET) would not survive the jump between stacks. */
static int vm_shadow_stack_on(void)
{
#if defined(__x86_64__)
    unsigned long features = 0;
    if (syscall(SYS_arch_prctl, 0x5005 /* ARCH_SHSTK_STATUS */, &features) == 0 && (features & 1))
        return 1;
#endif
    return 0;
}
static char vm_init_stack[256 * 1024] __attribute__((aligned(16)));

static int vm_init_main(void *p)
{
    struct vm_ctx *v = p;
    for (int i = 0; i < 3; i++)
        if (v->parent_ends[i] >= 0)
            close(v->parent_ends[i]);
    child_main(v->spec, &v->cx, 1);
    /* The payload: back into inc_enter, in this copy of the monitor's memory. */
    __builtin_longjmp(v->jb, 1);
    return 0;
}

/* Common start: pipes, clone, maps, go, wait for the child to reach its payload.
 * Returns 1 in the child (enter mode, payload), 0 in the parent on success, -1 on error.
 * With vm (enter mode), the child shares the caller's memory (see struct vm_ctx). */
static int start(const struct inc_spec *spec, struct inc_result *res, int enter, struct vm_ctx *vm)
{
    int sync[2] = {-1, -1}, errp[2] = {-1, -1}, statp[2] = {-1, -1};
    int with_init = (spec->ns_flags & INC_NS_PID) && spec->use_init;
    res->step = 0;
    res->err = 0;
    res->op_index = -1;
    res->pid = -1;
    res->pidfd = -1;
    res->status_fd = -1;
    res->used_clone3 = 0;
    res->hold_fd = -1;
    res->into_cgroup = 0;
    res->n_skipped = 0;

    if (pipe2(sync, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 || (with_init && pipe2(statp, O_CLOEXEC) < 0)) {
        res->step = INC_STEP_PIPE;
        res->err = errno;
        goto fail_pipes;
    }

    int pidfd = -1, used3 = 0, into_cgroup = 0;
    pid_t pid;
    if (vm != NULL) {
        vm->cx.sync_r = sync[0];
        vm->cx.err_w = errp[1];
        vm->cx.status_w = statp[1];
        vm->cx.hold_fd = -1;
        vm->cx.shared_vm = 1;
        vm->parent_ends[0] = sync[1];
        vm->parent_ends[1] = errp[0];
        vm->parent_ends[2] = statp[0];
        int flags = spec->ns_flags | CLONE_VM | SIGCHLD | (spec->want_pidfd ? CLONE_PIDFD : 0);
        pid = clone(vm_init_main, vm->stack_top, flags, vm, &pidfd);
        into_cgroup = 1;   /* it moves itself into its v2 cgroup too: nothing for the parent to write */
    } else {
        pid = parent_clone(spec, &pidfd, &used3, &into_cgroup);
    }
    if (pid < 0) {
        res->step = INC_STEP_CLONE;
        res->err = errno;
        goto fail_pipes;
    }
    if (pid == 0) {
        struct inc_child cx;
        close(sync[1]);
        close(errp[0]);
        if (statp[0] >= 0)
            close(statp[0]);
        cx.sync_r = sync[0];
        cx.err_w = errp[1];
        cx.status_w = statp[1];
        cx.hold_fd = -1;
        cx.shared_vm = 0;
        child_main(spec, &cx, enter);
        return 1;   /* enter mode only: the payload */
    }

    res->pid = pid;
    res->pidfd = pidfd;
    res->used_clone3 = used3;
    res->into_cgroup = into_cgroup;
    close_if(&sync[0]);
    close_if(&errp[1]);
    close_if(&statp[1]);

    if (parent_cgroups(spec, pid, res) < 0)
        goto fail_child;
    parent_test_stage(spec, INC_TEST_STAGE_AFTER_CLONE);
    if (parent_id_maps(spec, pid, res) < 0) {
        res->err = errno;
        goto fail_child;
    }
    /* sync[1] stays open until the payload runs: the child checks it to know that its
     * parent is still alive after its last setup step. */
    struct inc_record rec;
    int r = parent_go(sync[1], errp[0], &rec, res);
    while (r == 1 && (rec.step == INC_STEP_MAPS_REQUEST || rec.step == INC_STEP_HOLD_READY
                      || rec.step == INC_STEP_SKIPPED)) {
        if (rec.step == INC_STEP_SKIPPED) {
            /* Not a request: the child goes on by itself. */
            if (res->n_skipped < (int)(sizeof res->skipped / sizeof res->skipped[0]))
                res->skipped[res->n_skipped] = rec.op_index;
            res->n_skipped++;
            r = parent_read_record(errp[0], &rec);
            continue;
        }
        if (rec.step == INC_STEP_MAPS_REQUEST) {
            /* The child entered its user namespace after its privileged setup (unshare):
             * write its maps from here, in the parent user namespace. */
            struct inc_spec with_user = *spec;
            with_user.ns_flags |= INC_NS_USER;
            if (parent_id_maps(&with_user, pid, res) < 0) {
                res->err = errno;
                goto fail_child;
            }
        } else if (pidfd >= 0 && res->hold_fd < 0) {
            res->hold_fd = inc_pidfd_getfd(pidfd, rec.pad);   /* -1 if not permitted */
        }
        r = parent_go(sync[1], errp[0], &rec, res);
    }
    if (r == -2)
        goto fail_child;   /* the go byte could not be written: res says why */
    close_if(&sync[1]);
    if (r != 0) {
        if (r < 0) {
            res->step = INC_STEP_SYNC;
            res->err = errno ? errno : EIO;
        } else {
            res->step = rec.step;
            res->err = rec.err;
            res->op_index = rec.op_index;
        }
        goto fail_child;
    }
    close_if(&errp[0]);
    res->status_fd = statp[0];
    return 0;

fail_child:
    parent_reap(pid);
    close_if(&res->hold_fd);
    if (res->pidfd >= 0)
        close(res->pidfd);
    res->pidfd = -1;
    res->pid = -1;
fail_pipes:
    close_if(&sync[0]);
    close_if(&sync[1]);
    close_if(&errp[0]);
    close_if(&errp[1]);
    close_if(&statp[0]);
    close_if(&statp[1]);
    return -1;
}

int inc_spawn(const struct inc_spec *spec, struct inc_result *res)
{
    return start(spec, res, 0, NULL) < 0 ? -1 : 0;
}

/* The kernel's struct statx up to stx_mnt_id (glibc's names it a spare field), 256 bytes. */
struct inc_statx {
    uint32_t mask, blksize;
    uint64_t attributes;
    uint32_t nlink, uid, gid;
    uint16_t mode, pad1;
    uint64_t ino, size, blocks, attributes_mask;
    uint64_t times[8];   /* atime, btime, ctime, mtime: {s64 sec, u32 nsec, s32 pad} each */
    uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
    uint64_t mnt_id;
    uint64_t spare[13];
};
_Static_assert(sizeof(struct inc_statx) == 256 && offsetof(struct inc_statx, mnt_id) == 144, "struct statx layout");
#define INC_STATX_TYPE 0x1U
#define INC_STATX_MNT_ID 0x1000U
#define INC_AT_STATX_DONT_SYNC 0x4000

int inc_mount_id(const char *path, uint64_t *mnt_id, uint32_t *mode)
{
#ifdef SYS_statx
    struct inc_statx stx;
    memset(&stx, 0, sizeof stx);
    /* Not following the last component (a mount point is never a symlink), not triggering
     * an automount, and no round trip to a network filesystem's server. */
    if (syscall(SYS_statx, AT_FDCWD, path, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | INC_AT_STATX_DONT_SYNC,
                INC_STATX_TYPE | INC_STATX_MNT_ID, &stx) < 0)
        return -1;
    if (!(stx.mask & INC_STATX_MNT_ID)) {
        errno = ENOSYS;   /* before Linux 5.8 */
        return -1;
    }
    *mnt_id = stx.mnt_id;
    *mode = stx.mode & S_IFMT;
    return 0;
#else
    errno = ENOSYS;
    return -1;
#endif
}

int inc_pidfd_getfd(int pidfd, int targetfd)
{
    return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
}

int inc_status_size(void)
{
    return (int)sizeof(int32_t);
}

/* The monitor: the process that called inc_enter, once the sandbox runs.  It waits, then
 * leaves with the payload's status: the same exit code, or death by the same signal. */
static void monitor(struct inc_result *res)
{
    int st = 0;
    /* Hold nothing of the caller's (a concurrent spawn's error pipe, say). */
    child_close_all_but(res->status_fd, -1, 0);
    while (waitpid(res->pid, &st, 0) < 0) {
        if (errno != EINTR)
            _exit(125);
    }
    if (res->status_fd >= 0) {
        int32_t rec;
        ssize_t n;
        do {
            n = read(res->status_fd, &rec, sizeof rec);
        } while (n < 0 && errno == EINTR);
        if (n == (ssize_t)sizeof rec)
            st = rec;
    }
    if (WIFSIGNALED(st)) {
        int sig = WTERMSIG(st);
        struct rlimit nocore = {0, 0};
        setrlimit(RLIMIT_CORE, &nocore);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        sigaction(sig, &sa, NULL);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        kill(getpid(), sig);
        _exit(128 + sig);
    }
    _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 125);
}

int inc_enter(const struct inc_spec *spec, struct inc_result *res)
{
    if (spec->expect_ppid > 0) {
        /* The monitor dies with its parent (pytest), and the sandbox with the monitor. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) {
            res->step = INC_STEP_PDEATHSIG;   /* reported to the caller, typed */
            res->err = errno;
            res->op_index = -1;
            return -1;
        }
        if (getppid() != spec->expect_ppid)
            _exit(125);   /* the caller is gone already: nobody to report to */
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGCHLD, &dfl, NULL);   /* the monitor must be able to wait */
    struct vm_ctx *vm = NULL;
#if INC_RAW_SYSCALLS
    /* Only with an init: it forks the payload, the copy.  Without a pid namespace the cloned
     * child is the payload itself, and must not share the monitor's memory. */
    if (spec->enter_vm && (spec->ns_flags & INC_NS_PID) && spec->use_init && !vm_shadow_stack_on()
        && !(spec->cgroup_dirfd >= 0 && spec->cgroup_v2_procs_fd < 0)) {
        vm = &vm_ctx;
        vm->spec = spec;
        vm->res = res;
        vm->stack_top = vm_init_stack + sizeof vm_init_stack;
        vm_cur = vm;
        sigaltstack(NULL, &vm->altstack);
        /* Every signal blocked while the init shares this memory and errno with the
         * monitor's setup: no handler runs in either meanwhile.  The caller's mask goes to
         * the payload (and back to the monitor on failure). */
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_SETMASK, &all, &vm->cx.oldmask);
        if (__builtin_setjmp(vm->jb)) {
            vm_payload_landed();   /* the payload (see vm_init_main) */
            return 0;
        }
    }
#endif
    int r = start(spec, res, 1, vm);
    if (r < 0 && vm != NULL)
        sigprocmask(SIG_SETMASK, &vm_ctx.cx.oldmask, NULL);
    if (r == 1) {
        /* the payload */
        res->step = 0;
        res->pid = -1;
        res->pidfd = -1;
        res->status_fd = -1;
        return 0;
    }
    if (r < 0)
        return -1;
    if (res->pidfd >= 0)
        close(res->pidfd);
    monitor(res);
    return -1; /* not reached */
}

/* ------------------------------------------------------------ direct enter ---- */

/* Direct enter: inc_enter's CLONE_VM start, called by the Python process itself instead of
 * a forked monitor, so that the payload is the only copy of its memory.  The init shares
 * the caller's memory for its whole life, on a stack of its own (inc_direct_new: a guard
 * page, the stack, then the init's context above it), and keeps to raw system calls once
 * the caller runs again.  The core keeps a registry of these inits: each one's pid, its
 * memory and its status pipe, until inc_direct_reap has waited for it; only then is its
 * stack unmapped.  The init clears the memory's dumpable flag before forking the payload
 * (see child_main); the registry gives the flag back when its last init is reaped, if the
 * flag was set before the first and nobody changed it since. */
#define INC_DIRECT_STACK (256 * 1024)
#define INC_DIRECT_MAX 64

struct direct_entry {
    pid_t pid;
    int status_fd;
    void *mem;
};
static struct direct_entry direct_live[INC_DIRECT_MAX];
static int direct_n;
static int direct_saved_dumpable = -1;   /* the flag before the first live init cleared it */

static size_t direct_page(void)
{
    long pg = sysconf(_SC_PAGESIZE);
    return pg > 0 ? (size_t)pg : 4096;
}

static size_t direct_size(void)
{
    size_t pg = direct_page();
    return pg + INC_DIRECT_STACK + ((sizeof(struct vm_ctx) + pg - 1) / pg) * pg;
}

static struct vm_ctx *direct_ctx(void *mem)
{
    return (struct vm_ctx *)((char *)mem + direct_page() + INC_DIRECT_STACK);
}

int inc_direct_available(void)
{
#if INC_RAW_SYSCALLS
    return !vm_shadow_stack_on();
#else
    return 0;
#endif
}

void *inc_direct_new(void)
{
    if (direct_n >= INC_DIRECT_MAX) {
        errno = EAGAIN;   /* the caller reaps, or forks a monitor */
        return NULL;
    }
    size_t size = direct_size();
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (mprotect(p, direct_page(), PROT_NONE) < 0) {   /* an overflow faults, not corrupts */
        munmap(p, size);
        return NULL;
    }
    return p;
}

void inc_direct_free(void *mem)
{
    if (mem != NULL)
        munmap(mem, direct_size());
}

static void direct_restore_dumpable(void)
{
    if (direct_n == 0 && direct_saved_dumpable == 1 && prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
        prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    if (direct_n == 0)
        direct_saved_dumpable = -1;
}

static int direct_threads(void)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[4096];
    int n = 0;
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (got <= 0)
            break;
        for (long off = 0; off < got;) {
            unsigned short reclen = *(unsigned short *)(buf + off + 16);
            const char *name = buf + off + 19;
            if (name[0] != '.')
                n++;
            off += reclen;
        }
    }
    close(fd);
    return n;
}

#if INC_RAW_SYSCALLS
/* Before start() of a directly started init, in the caller: its context above its stack in
 * mem, the caller's alternate signal stack and signal mask saved, every signal blocked (no
 * handler of the caller's runs while the init shares its memory). */
static struct vm_ctx *direct_begin(const struct inc_spec *spec, struct inc_result *res, void *mem)
{
    struct vm_ctx *vm = direct_ctx(mem);
    memset(vm, 0, sizeof *vm);
    vm->spec = spec;
    vm->res = res;
    vm->cx.dumpable = -1;
    vm->stack_top = (char *)((uintptr_t)vm & ~(uintptr_t)15);   /* grows down, toward the guard page */
    sigaltstack(NULL, &vm->altstack);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &vm->cx.oldmask);
    return vm;
}

/* After start() of a directly started init (r: its result), in the caller: a live init is
 * registered before the caller can run any code of its own, and the caller keeps none of its
 * descriptors (the payload, or the copy that joins, reads its own upper layers); an init that
 * cleared the memory's dumpable flag and then failed (start reaped it) gives the flag back.
 * Then the caller's signal mask comes back. */
static void direct_started(int r, struct vm_ctx *vm, struct inc_result *res, void *mem)
{
    if (r == 0) {
        if (direct_n == 0)
            direct_saved_dumpable = vm->cx.dumpable;
        direct_live[direct_n].pid = res->pid;
        direct_live[direct_n].status_fd = res->status_fd;
        direct_live[direct_n].mem = mem;
        direct_n++;
        close_if(&res->pidfd);
        close_if(&res->hold_fd);
        res->status_fd = -1;   /* the registry's */
    } else if (direct_n == 0 && vm->cx.dumpable == 1 && prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0) {
        prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    }
    sigprocmask(SIG_SETMASK, &vm->cx.oldmask, NULL);
}
#endif

#if !INC_RAW_SYSCALLS
/* Without raw system calls (AddressSanitizer, other architectures) no init may share the
 * caller's memory: the callers fork a monitor instead. */
static int direct_unsupported(struct inc_result *res)
{
    res->step = INC_STEP_CLONE;
    res->err = ENOSYS;
    res->op_index = -1;
    return -1;
}
#endif

int inc_enter_direct(const struct inc_spec *spec, struct inc_result *res, void *mem)
{
#if INC_RAW_SYSCALLS
    if (direct_threads() != 1) {
        res->step = 0;
        return 2;   /* not single-threaded (now): the caller forks a monitor instead */
    }
    struct vm_ctx *vm = direct_begin(spec, res, mem);
    vm_cur = vm;
    if (__builtin_setjmp(vm->jb)) {
        vm_payload_landed();   /* the payload (see vm_init_main): nothing of the registry is its */
        direct_n = 0;
        direct_saved_dumpable = -1;
        return 1;
    }
    int r = start(spec, res, 1, vm);
    direct_started(r, vm, res, mem);
    return r < 0 ? -1 : 0;
#else
    (void)spec;
    (void)mem;
    return direct_unsupported(res);
#endif
}

/* A held sandbox, for a caller that may have other threads: the init is started as by
 * inc_enter_direct (CLONE_VM, its own stack, registered until inc_direct_reap), runs the
 * ops, then holds the sandbox instead of forking a payload (spec->hold_init), and the
 * caller forks its own copy into it (inc_setns, fork, inc_join in the child).  The init
 * copies nothing and runs only system calls that take no lock of the caller's, so the
 * caller's other threads are no hazard: its fork is the C library's, which handles them.
 * 0 (res->pid: the init), -1 with res naming the step. */
int inc_hold_direct(const struct inc_spec *spec, struct inc_result *res, void *mem)
{
#if INC_RAW_SYSCALLS
    if (!spec->hold_init || !(spec->ns_flags & INC_NS_PID) || !spec->use_init) {
        res->step = INC_STEP_CLONE;   /* the init would fork a payload that lands nowhere */
        res->err = EINVAL;
        res->op_index = -1;
        return -1;
    }
    struct vm_ctx *vm = direct_begin(spec, res, mem);
    int r = start(spec, res, 1, vm);
    direct_started(r, vm, res, mem);
    return r < 0 ? -1 : 0;
#else
    (void)spec;
    (void)mem;
    return direct_unsupported(res);
#endif
}

/* -------------------------------------------------------------------- join ---- */

int inc_setns(int fd, int ns_flags)
{
    return (int)syscall(SYS_setns, fd, ns_flags);
}

/* The ops that set attributes of the process itself, which a process joining a held
 * sandbox does not inherit from its init: it applies them again.  The others (mounts,
 * the hostname, the loopback, namespaces) belong to the namespaces it joins. */
static int op_is_process_attr(int kind)
{
    switch (kind) {
    case INC_OP_RLIMIT:
    case INC_OP_AFFINITY:
    case INC_OP_CHDIR:
    case INC_OP_UMASK:
    case INC_OP_NO_NEW_PRIVS:
    case INC_OP_SETSID:
    case INC_OP_DROP_PRIVS:
        return 1;
    default:
        return 0;
    }
}

int inc_join(const struct inc_spec *spec, int pidfd, int ns_flags, struct inc_result *res)
{
    res->step = 0;
    res->err = 0;
    res->op_index = -1;
    /* The upper layers' fd first, while this process is still outside: pidfd_getfd needs
     * ptrace access to the init from here. */
    for (int i = 0; i < spec->n_ops; i++) {
        const struct inc_op *op = &spec->ops[i];
        if (op->kind != INC_OP_HOLD)
            continue;
        int fd = inc_pidfd_getfd(pidfd, op->ival);
        if (fd < 0 || (fd != op->ival && dup3(fd, op->ival, O_CLOEXEC) < 0)) {
            res->step = INC_STEP_OP;
            res->err = errno;
            res->op_index = i;
            if (fd >= 0)
                close(fd);
            return -1;
        }
        if (fd != op->ival)
            close(fd);
    }
    if (syscall(SYS_setns, pidfd, ns_flags) < 0) {
        res->step = INC_STEP_JOIN;
        res->err = errno;
        return -1;
    }
    struct inc_child cx;
    memset(&cx, 0, sizeof cx);
    cx.sync_r = cx.err_w = cx.status_w = cx.hold_fd = -1;
    for (int i = 0; i < spec->n_ops; i++) {
        const struct inc_op *op = &spec->ops[i];
        if (!op_is_process_attr(op->kind))
            continue;
        if (child_op(&cx, op, i) < 0 && !(errno == ENOENT && (op->flags & INC_OP_OPTIONAL))) {
            res->step = INC_STEP_OP;
            res->err = errno;
            res->op_index = i;
            return -1;
        }
    }
    if (spec->die_with_parent && prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) {
        res->step = INC_STEP_PDEATHSIG;
        res->err = errno;
        return -1;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGCHLD, &dfl, NULL);
    if (spec->setsid_payload && setsid() < 0) {
        res->step = INC_STEP_SETSID;
        res->err = errno;
        return -1;
    }
    /* A copy of a caller whose memory a held init made non-dumpable: the copy is nobody
     * else's, so it gets the flag the caller had before (as the payload of direct enter). */
    if (direct_saved_dumpable == 1)
        prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    direct_n = 0;
    direct_saved_dumpable = -1;
    return 0;
}

int inc_direct_live(void)
{
    return direct_n;
}

void inc_direct_drop_status(int pid)
{
    for (int i = 0; i < direct_n; i++)
        if (direct_live[i].pid == pid && direct_live[i].status_fd >= 0) {
            close(direct_live[i].status_fd);
            direct_live[i].status_fd = -1;
        }
}

int inc_direct_owns(const void *mem)
{
    for (int i = 0; i < direct_n; i++)
        if (direct_live[i].mem == mem)
            return 1;
    return 0;
}

int inc_direct_reap(int pid, int nohang, int *payload_status, long long *cpu_us)
{
    if (direct_n == 0)
        return -1;
    int i = 0, st = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    pid_t got = 0;
    if (pid > 0) {
        while (i < direct_n && direct_live[i].pid != pid)
            i++;
        if (i >= direct_n)
            return -1;
        do {
            got = wait4(pid, &st, nohang ? WNOHANG : 0, &ru);
        } while (got < 0 && errno == EINTR);
    } else {
        /* any: the first that has exited (nohang), or the first registered */
        for (i = 0; i < direct_n; i++) {
            do {
                got = wait4(direct_live[i].pid, &st, nohang ? WNOHANG : 0, &ru);
            } while (got < 0 && errno == EINTR);
            if (got != 0 || !nohang)
                break;
        }
        if (i >= direct_n)
            return 0;
    }
    if (got == 0)
        return 0;
    struct direct_entry e = direct_live[i];
    /* got == e.pid, or ECHILD: reaped behind our back (SIGCHLD ignored); gone either way */
    int32_t rec = 0;
    ssize_t n = -1;
    if (e.status_fd >= 0) {
        do {
            n = read(e.status_fd, &rec, sizeof rec);
        } while (n < 0 && errno == EINTR);
        close(e.status_fd);
    }
    if (payload_status != NULL)
        *payload_status = n == (ssize_t)sizeof rec ? rec : (got > 0 ? st : 0);
    if (cpu_us != NULL)
        *cpu_us = (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000
                  + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
    inc_direct_free(e.mem);
    direct_live[i] = direct_live[--direct_n];
    direct_restore_dumpable();
    return e.pid;
}
