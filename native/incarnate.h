/*
 * pytest-incarnate native core: the C API.
 *
 * Everything the child needs is prepared by the caller (Python) in the parent: a flat
 * spec with an ordered list of operations whose strings are already formatted and
 * NUL-terminated.  Between clone and exec/_exit the child only makes raw system calls:
 * no allocation, no stdio, no strerror.
 *
 * A failure anywhere is returned as data: (step, errno, op index), never as an exit of
 * the caller's process.
 */
#ifndef INCARNATE_H
#define INCARNATE_H

#include <stdint.h>

/* Namespaces, the same bits as the kernel's CLONE_NEW* flags. */
#define INC_NS_CGROUP 0x02000000
#define INC_NS_UTS    0x04000000
#define INC_NS_IPC    0x08000000
#define INC_NS_USER   0x10000000
#define INC_NS_PID    0x20000000
#define INC_NS_NET    0x40000000
#define INC_NS_MOUNT  0x00020000

/* Child operations, executed in order after the parent's go. */
enum inc_op_kind {
    INC_OP_HOSTNAME = 1,   /* a = hostname */
    INC_OP_LOOPBACK,       /* bring up lo */
    INC_OP_RPRIVATE,       /* a = path (normally "/"): MS_REC|MS_PRIVATE */
    INC_OP_TMPFS,          /* a = target, b = mount data ("mode=0755,size=..."), flags = mount flags */
    INC_OP_BIND,           /* a = source, b = target; flags: INC_BIND_* */
    INC_OP_OVERLAY,        /* b = target, c = mount data ("lowerdir=...,upperdir=...,workdir=...") */
    INC_OP_PROC,           /* b = target */
    INC_OP_STAGE,          /* a = base dir: tmpfs on it, pivot into it, old root at /oldroot */
    INC_OP_PIVOT,          /* a = new root: pivot_root(".", ".") there, old root detached */
    INC_OP_MKDIR,          /* a = path, ival = mode */
    INC_OP_CHDIR,          /* a = path */
    INC_OP_UMASK,          /* ival = mask */
    INC_OP_NO_NEW_PRIVS,
    INC_OP_SETSID,
    INC_OP_DROP_PRIVS,     /* uid, gid; flags & INC_DROP_SETGROUPS: clear supplementary groups */
    INC_OP_REMOUNT_RO,     /* a = path, recursive */
    INC_OP_UNSHARE,        /* ival = CLONE_NEW* flags; with a user namespace, the parent writes
                              its id maps (a MAPS_REQUEST record) before the child goes on */
    INC_OP_SYMLINK,        /* a = link text, b = path of the link */
    INC_OP_DEVPTS,         /* b = target: a new devpts instance */
    INC_OP_HOLD,           /* a = directory, ival = fd number: keep it open there (the init keeps
                              it too), so the caller can take it with pidfd_getfd */
    INC_OP_RLIMIT,         /* ival = resource, v1 = soft, v2 = hard */
    INC_OP_AFFINITY,       /* v1, v2 = CPU mask (CPUs 0-63, 64-127) */
    INC_OP__MAX
};

/* INC_OP_BIND flags */
#define INC_BIND_RO      0x1   /* read-only, recursively */
#define INC_BIND_CREATE  0x2   /* create the target (and its parents) if missing */
#define INC_BIND_REC     0x4   /* recursive bind (submounts too) */
#define INC_DROP_SETGROUPS 0x1
#define INC_UNSHARE_SELF_MAP 0x1 /* INC_OP_UNSHARE with CLONE_NEWUSER: map the own id (a, b) */
/* Any op kind: optional.  ENOENT from it (its source or target vanished since the parent
 * planned it: a host mount unmounted, its mount point removed) skips it, together with the
 * `dependents` ops right after it (the mounts nested under it), instead of failing the
 * setup.  The child tells the parent (an INC_STEP_SKIPPED record: inc_result.n_skipped). */
#define INC_OP_OPTIONAL  0x10000

struct inc_op {
    int kind;
    int ival;
    unsigned long flags;
    uint32_t uid;
    uint32_t gid;
    const char *a;
    const char *b;
    const char *c;
    uint64_t v1;
    uint64_t v2;
    int dependents;        /* with INC_OP_OPTIONAL: the ops right after it skipped with it */
};

/* Steps named in errors.  Values are stable: Python maps them to names. */
enum inc_step {
    INC_STEP_NONE = 0,
    INC_STEP_PIPE,
    INC_STEP_CLONE,
    INC_STEP_SETGROUPS,
    INC_STEP_UID_MAP,
    INC_STEP_GID_MAP,
    INC_STEP_SYNC,
    INC_STEP_PDEATHSIG,
    INC_STEP_OP,           /* detail in op_index / op kind */
    INC_STEP_INIT_FORK,
    INC_STEP_SIGMASK,
    INC_STEP_STDIO,
    INC_STEP_CLOSE_FDS,
    INC_STEP_EXEC,
    INC_STEP_WAIT,
    INC_STEP_SETSID,
    INC_STEP_MAPS_REQUEST, /* not an error: the child asks the parent for its id maps */
    INC_STEP_HOLD_READY,   /* not an error: the held fd is in place for pidfd_getfd */
    INC_STEP_CGROUP,       /* writing the child's pid into a cgroup.procs (op_index: which) */
    INC_STEP_GO,           /* the parent's write of the go byte (sync pipe) failed */
    INC_STEP_RECORD,       /* the child could not write a record (its request for id maps, the
                              held fd's readiness, a skipped op) to the parent: op_index = the op */
    INC_STEP_SKIPPED,      /* not an error: an optional op was skipped (op_index) */
    INC_STEP_JOIN,         /* inc_join: setns into a held sandbox's namespaces failed */
    INC_STEP__MAX
};

struct inc_spec {
    int ns_flags;              /* INC_NS_* */
    int use_clone3;            /* 0: go straight to clone(2) (tests the fallback) */
    int want_pidfd;
    int use_init;              /* with INC_NS_PID: a pid-1 init reaps and forwards signals */
    int die_with_parent;       /* PR_SET_PDEATHSIG(SIGKILL) */

    /* id maps, written by the parent; NULL = do not write */
    const char *uid_map;
    const char *gid_map;
    int setgroups_deny;

    const struct inc_op *ops;
    int n_ops;

    /* spawn mode: argv == NULL means "run the ops, then _exit(0)" (used by the probe) */
    const char *exe;
    char *const *argv;
    char *const *envp;
    int stdin_fd, stdout_fd, stderr_fd;   /* -1 = inherit */
    int close_fds;                        /* close every fd >= 3 except keep_fds */
    const int *keep_fds;                  /* sorted ascending */
    int n_keep_fds;
    int setsid_payload;
    int expect_ppid;      /* enter mode: the caller's parent; the caller dies with it */
    int enter_vm;         /* enter mode: start the init with CLONE_VM (x86_64, aarch64; not under ASan) */

    /* cgroups: the child is placed in them before it runs anything */
    int cgroup_dirfd;                  /* cgroup v2 directory for CLONE_INTO_CGROUP, or -1 */
    const int *cgroup_procs_fds;       /* v1 "tasks" files (opened by the caller): the child writes
                                          "0" into each, moving itself, as its first step */
    int n_cgroup_procs_fds;
    int cgroup_v2_procs_fd;            /* v2 cgroup.procs, written only if CLONE_INTO_CGROUP failed */

    /* Test-only (tests/test_kill_matrix.py; set by _ffi.py from INCARNATE_TEST_STAGE_FIFO):
     * with test_stage == INC_TEST_STAGE_AFTER_CLONE, the parent writes "after-clone\n" to
     * test_stage_fd right after clone, before the id maps, and stays there until it is
     * killed.  0 (the default): off. */
    int test_stage;
    int test_stage_fd;
    /* With an init: the init runs the ops, then holds the sandbox (no payload; it reaps
     * whatever joins it) until it is killed (inc_hold_direct).  Processes join it with
     * inc_join. */
    int hold_init;
};

#define INC_TEST_STAGE_AFTER_CLONE 1

struct inc_result {
    int step;        /* enum inc_step, 0 on success */
    int err;         /* errno of the failed step */
    int op_index;    /* index in spec->ops for INC_STEP_OP, else -1 */
    int pid;         /* spawn: the first child (the init when there is one) */
    int pidfd;       /* spawn with want_pidfd: a pidfd for pid, else -1 */
    int status_fd;   /* spawn with an init: read end carrying the payload's wait status */
    int used_clone3; /* 1 if clone3 created the child, 0 if clone(2) did */
    int hold_fd;     /* INC_OP_HOLD: the caller's duplicate of the held directory, else -1 */
    int into_cgroup; /* 1 if CLONE_INTO_CGROUP placed the child */
    int n_skipped;   /* optional ops skipped (INC_OP_OPTIONAL, ENOENT), dependents not counted */
    int skipped[16]; /* the op indices of the first 16 of them */
};

/* Spawn: clone the child into the namespaces, write its id maps, let it run the ops and
 * exec.  Returns 0 and fills pid/pidfd, or -1 with step/err/op_index filled and nothing
 * left behind (the child is killed and reaped). */
int inc_spawn(const struct inc_spec *spec, struct inc_result *res);

/* Enter: for a freshly forked, single-threaded process.  On success returns 0 in the
 * payload, which runs inside the namespaces (pid 2 under an init when the spec has a pid
 * namespace); the calling process itself never returns on success: it waits for the
 * sandbox and exits with the payload's status (or dies by the payload's signal).
 * Returns -1 in the calling process, with res filled, when setup failed. */
int inc_enter(const struct inc_spec *spec, struct inc_result *res);

/* Direct enter, for the calling process itself; called through inc_enter_direct_py (the
 * module's wrapper that holds the interpreter's fork protocol around it, see build_ffi.py).
 * `mem` comes from inc_direct_new (NULL with errno EAGAIN when 64 inits are live).  Returns
 * 1 in the payload (pid 2 under the init), 0 in the caller with the init registered (see
 * inc_direct_reap: its stack and status pipe are the registry's, res->pid names it), 2 when
 * the caller is not single-threaded (nothing done: fork a monitor instead; `mem` is the
 * caller's to free), or -1 with res filled and nothing left behind (`mem` is the caller's).
 * inc_direct_available() is 0 where it cannot work (no raw system calls, shadow stacks). */
int inc_direct_available(void);
void *inc_direct_new(void);
void inc_direct_free(void *mem);
int inc_enter_direct(const struct inc_spec *spec, struct inc_result *res, void *mem);
/* Wait for a registered init (pid, or any with -1; nohang: only if it has exited): its
 * payload's raw wait status and the CPU time of the sandbox, in microseconds.  Returns the
 * pid, 0 if it is still running (nohang), -1 if no such init is registered.  Unmaps its
 * stack, and gives the dumpable flag back after the last one. */
int inc_direct_reap(int pid, int nohang, int *payload_status, long long *cpu_us);
int inc_direct_live(void);
/* Close a registered init's status pipe: its payload's status is not wanted (the caller
 * has the result), and a finished sandbox waiting to be reaped holds no descriptor. */
void inc_direct_drop_status(int pid);
/* 1 if `mem` is a live init's (registered), else 0. */
int inc_direct_owns(const void *mem);

/* Decode a status record read from status_fd: the payload's raw wait status. */
int inc_status_size(void);
/* Join a sandbox held by an init (hold_init): in a child forked by the caller after the
 * caller set its pid namespace for children to the init's (inc_setns), take the upper
 * layers' fd the init holds (INC_OP_HOLD), enter the init's other namespaces (ns_flags,
 * one setns), then apply the ops of spec that set process attributes (rlimits, CPU
 * affinity, working directory, umask, no_new_privs, setsid, dropped privileges), the
 * parent-death signal and, with setsid_payload, a session of its own.  0, or -1 with res
 * naming the step (INC_STEP_JOIN, INC_STEP_OP with op_index) and errno. */
int inc_join(const struct inc_spec *spec, int pidfd, int ns_flags, struct inc_result *res);
/* setns(2): 0, or -1 with errno. */
int inc_setns(int fd, int ns_flags);
/* Start an init that holds a sandbox (spec->hold_init) from the caller itself, as
 * inc_enter_direct does, but whatever the caller's threads: see incarnate.c. */
int inc_hold_direct(const struct inc_spec *spec, struct inc_result *res, void *mem);

/* The mount id (statx STATX_MNT_ID, the first field of /proc/self/mountinfo) of what `path`
 * resolves to, its last component not followed and no automount triggered, and its file
 * type (S_IFMT bits).  Returns 0, or -1 with errno (ENOSYS: the kernel has no STATX_MNT_ID).
 * Parent side. */
int inc_mount_id(const char *path, uint64_t *mnt_id, uint32_t *mode);

/* pidfd_getfd(2): a duplicate of fd `targetfd` of the process behind `pidfd`, or -1. */
int inc_pidfd_getfd(int pidfd, int targetfd);

#endif
