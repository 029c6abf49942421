/*
 * Experiment, not part of the core: does sharing the caller's address space with the
 * sandbox's first child (CLONE_VM, like posix_spawn and vfork) remove the cost that
 * grows with the caller's memory?
 *
 * proto_spawn(use_vm, exe, envp) does what native/incarnate.c does for a spawn, minus the
 * mount operations: clone into user+mount+pid+net+uts+ipc namespaces, the parent writes
 * the identity id maps and sends the go byte, the child (the pid-1 init) sets the
 * hostname and starts the payload with CLONE_VM|CLONE_VFORK, the payload execs, the
 * init reaps it and exits, the caller reaps the init.
 *
 *   use_vm = 0: the first child is created like the core does today (a copy of the
 *               caller's address space: page tables copied, pages copy-on-write);
 *   use_vm = 1: CLONE_VM on a stack of its own (no copy); all signals blocked around
 *               the clone and reset to default in the child, as posix_spawn does, so no
 *               handler of the caller ever runs in the child.
 *
 * Built and driven by bench/clone_vm_experiment.py.  Root only (identity maps).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define NS (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC)
#define STACK (64 * 1024)

struct arg {
    int sync_r, err_w;
    const char *exe;
    char *const *envp;
    char *payload_stack_top;
    int reset_signals;
};

static int payload(void *p)
{
    struct arg *a = p;
    char *argv[] = {(char *)a->exe, NULL};
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(a->exe, argv, a->envp);
    _exit(127);
}

static int init_main(void *p)
{
    struct arg *a = p;
    if (a->reset_signals) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        for (int s = 1; s < 65; s++)
            if (s != SIGKILL && s != SIGSTOP)
                syscall(SYS_rt_sigaction, s, &sa, NULL, 8);
    }
    char go;
    if (read(a->sync_r, &go, 1) != 1)
        _exit(126);
    if (sethostname("incarnate", 9) < 0)
        _exit(125);
    pid_t pid = clone(payload, a->payload_stack_top, CLONE_VM | CLONE_VFORK | SIGCHLD, a);
    if (pid < 0)
        _exit(124);
    close(a->err_w);
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 123);
}

static int write_file(pid_t pid, const char *name, const char *data)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, name);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, data, strlen(data));
    close(fd);
    return w < 0 ? -1 : 0;
}

/* Returns the payload's exit status (0 for /bin/true), or -errno. */
int proto_spawn(int use_vm, const char *exe, char *const *envp)
{
    int sync[2], errp[2];
    if (pipe2(sync, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0)
        return -errno;
    char *stacks = mmap(NULL, 2 * STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stacks == MAP_FAILED)
        return -errno;
    struct arg a = {sync[0], errp[1], exe, envp, stacks + 2 * STACK, use_vm};
    sigset_t all, old;
    sigfillset(&all);
    pid_t pid;
    if (use_vm) {
        sigprocmask(SIG_BLOCK, &all, &old);
        pid = clone(init_main, stacks + STACK, CLONE_VM | NS | SIGCHLD, &a);
        sigprocmask(SIG_SETMASK, &old, NULL);
    } else {
        pid = (pid_t)syscall(SYS_clone, NS | SIGCHLD, 0, NULL, NULL, 0);
        if (pid == 0)
            init_main(&a);
    }
    int ret = 0;
    if (pid < 0) {
        ret = -errno;
        goto out;
    }
    close(sync[0]);
    close(errp[1]);
    sync[0] = errp[1] = -1;
    if (write_file(pid, "uid_map", "0 0 4294967295") < 0 || write_file(pid, "gid_map", "0 0 4294967295") < 0)
        ret = -errno;
    if (write(sync[1], "g", 1) != 1 && ret == 0)
        ret = -errno;
    char buf[16];
    while (read(errp[0], buf, sizeof buf) > 0)   /* EOF: the payload exec'd (close-on-exec) */
        ;
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (ret == 0)
        ret = WIFEXITED(st) ? WEXITSTATUS(st) : 255;
out:
    for (int *fd = &sync[0]; fd <= &sync[1]; fd++)
        if (*fd >= 0)
            close(*fd);
    if (errp[0] >= 0)
        close(errp[0]);
    if (errp[1] >= 0)
        close(errp[1]);
    munmap(stacks, 2 * STACK);
    return ret;
}
