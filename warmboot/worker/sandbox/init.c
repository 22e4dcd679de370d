/* warmboot-init: PID 1 of every function container, and the step that takes its privileges away.
 *
 *   init [--root DIR [--cwd DIR]] --seccomp FILE --caps NAME,NAME,... -- PROGRAM ARGS...
 *
 * The launcher has already made the namespaces and mounted the container's root filesystem; with --root this
 * program makes DIR the root (pivot_root) and detaches the host's tree, then locks the process down, starts
 * PROGRAM as its only child and stays PID 1 to forward signals and reap orphans.
 * Built static (scripts/build-init.sh) because it runs inside arbitrary images (busybox, alpine, distroless):
 * it needs nothing but the kernel, not even /proc. Any setup failure exits 125 with one line on stderr,
 * so the owner can tell "the sandbox refused" from the program's own exit codes. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *const CAP_NAMES[] = {
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap",
    "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf",
    "checkpoint_restore"};
#define NCAPS ((int)(sizeof CAP_NAMES / sizeof *CAP_NAMES))
/* What the owner may send PID 1 to stop or poke the program. */
static const int FORWARDED[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
#define NFORWARDED (sizeof FORWARDED / sizeof *FORWARDED)

/* One line on stderr, with the errno text when there is one, and the exit code that means "setup failed". */
static void die(const char *fmt, const char *arg) {
    int err = errno;
    fprintf(stderr, "warmboot-init: ");
    fprintf(stderr, fmt, arg);
    if (err) fprintf(stderr, ": %s", strerror(err));
    fprintf(stderr, "\n");
    exit(125);
}

/* "chown,kill,..." -> bit mask ("none" or "": no capability at all); an unknown name is a launcher bug, so it
 * is fatal rather than skipped. */
static unsigned long long parse_caps(char *list) {
    unsigned long long mask = 0;
    if (strcmp(list, "none") == 0) return 0;
    for (char *name = strtok(list, ","); name; name = strtok(NULL, ",")) {
        int i = 0;
        while (i < NCAPS && strcmp(CAP_NAMES[i], name) != 0) i++;
        if (i == NCAPS) {
            errno = 0;
            die("unknown capability '%s' in --caps", name);
        }
        mask |= 1ULL << i;
    }
    return mask;
}

static void on_signal(int sig) { (void)sig; } /* never runs (signals stay blocked); see main */

int main(int argc, char **argv) {
    const char *seccomp_file = NULL, *root = NULL, *cwd = "/";
    char *caps = NULL;
    int i = 1;
    for (; i + 1 < argc && strcmp(argv[i], "--") != 0; i += 2) {
        if (strcmp(argv[i], "--seccomp") == 0) seccomp_file = argv[i + 1];
        else if (strcmp(argv[i], "--caps") == 0) caps = argv[i + 1];
        else if (strcmp(argv[i], "--root") == 0) root = argv[i + 1];
        else if (strcmp(argv[i], "--cwd") == 0) cwd = argv[i + 1];
        else break;
    }
    if (!seccomp_file || !caps || i >= argc - 1 || strcmp(argv[i], "--") != 0) {
        fprintf(stderr, "usage: warmboot-init [--root DIR [--cwd DIR]] --seccomp FILE --caps NAME,... -- PROGRAM ARGS...\n");
        return 125;
    }
    char **program = argv + i + 1;
    unsigned long long keep = parse_caps(caps);
    errno = 0;

    /* 0. The container's root. Done here rather than by pivot_root(8) and umount(8) in the launcher: once the
     *    root is swapped, those programs would have to come from the image, which need not have them (busybox,
     *    distroless). pivot_root(".", ".") stacks the old root on the new one; detaching it leaves nothing of
     *    the host's mount tree in the container. */
    if (root) {
        if (chdir(root) < 0) die("cannot enter the root %s", root);
        if (syscall(SYS_pivot_root, ".", ".") < 0) die("%s", "pivot_root");
        if (umount2(".", MNT_DETACH) < 0) die("%s", "detaching the host's root");
        if (chdir(cwd) < 0) die("cannot enter the working directory %s", cwd);
    }

    /* 1. Own session, no controlling terminal: the host's terminal (TIOCSTI injection, job-control signals)
     *    is out of reach. Already leading a session (the launcher did it) is fine. */
    if (getsid(0) != getpid() && setsid() < 0) die("%s", "setsid");

    /* 2. Read the filter now, while we may still read any file; closing it leaves nothing behind for PROGRAM. */
    static struct sock_filter insns[BPF_MAXINSNS + 1]; /* one spare to detect a program the kernel refuses */
    int fd = open(seccomp_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("cannot read seccomp file %s", seccomp_file);
    ssize_t n = 0, got;
    while ((got = read(fd, (char *)insns + n, sizeof insns - n)) > 0) n += got;
    if (got < 0) die("cannot read seccomp file %s", seccomp_file);
    close(fd);
    if (n == 0 || n % sizeof *insns != 0 || n / sizeof *insns > BPF_MAXINSNS) {
        errno = 0;
        die("seccomp file %s is not a BPF program", seccomp_file);
    }
    struct sock_fprog prog = {.len = (unsigned short)(n / sizeof *insns), .filter = insns};

    /* 3. no_new_privs: no setuid binary or file capability in the image can give back what we drop below, and
     *    it is what lets step 5 install a filter without CAP_SYS_ADMIN (which step 4 removes). */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("%s", "PR_SET_NO_NEW_PRIVS");

    /* 4. Capabilities. The bounding set first: dropping from it needs CAP_SETPCAP in the effective set, which
     *    capset may take away; and root's execve recomputes permitted = inheritable | bounding, so the bounding
     *    set is what really limits PROGRAM. The last capability is probed with PR_CAPBSET_READ (EINVAL past
     *    the end) rather than read from /proc/sys/kernel/cap_last_cap, which an image need not have mounted. */
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
        if (!(cap < 64 && (keep >> cap & 1)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) die("%s", "PR_CAPBSET_DROP");
    errno = 0;
    /* Ambient capabilities survive execve for non-root programs: none may. */
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) die("%s", "PR_CAP_AMBIENT_CLEAR_ALL");
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    for (int w = 0; w < 2; w++)
        data[w].effective = data[w].permitted = data[w].inheritable = (unsigned)(keep >> (32 * w));
    if (syscall(SYS_capset, &hdr, data) < 0) die("%s", "capset");

    /* 5. Seccomp last, so that it constrains the program and not this set-up. Without CAP_SYS_ADMIN (gone
     *    since step 4) the kernel accepts a filter only under no_new_privs (step 3). TSYNC puts every thread
     *    under it (there is one: belt and braces). Inherited across fork and execve, and never removable. */
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog) != 0) die("%s", "seccomp");

    /* 6. Block the signals we forward (and SIGCHLD) before fork, so none is lost between fork and the wait
     *    loop; they are handled synchronously with sigwaitinfo. Handlers are installed as well because the
     *    kernel discards signals that PID 1 of a namespace has left at SIG_DFL. */
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    struct sigaction sa = {.sa_handler = on_signal};
    for (size_t k = 0; k < NFORWARDED; k++) {
        sigaddset(&set, FORWARDED[k]);
        sigaction(FORWARDED[k], &sa, NULL);
    }
    sigaction(SIGCHLD, &sa, NULL);
    sigprocmask(SIG_BLOCK, &set, &old);

    pid_t child = fork();
    if (child < 0) die("%s", "fork");
    if (child == 0) {
        /* PROGRAM gets default dispositions and the mask the launcher gave us. It is not PID 1, so it can be
         * signalled like any process; it keeps our fds (stdio and the control pipes). */
        sa.sa_handler = SIG_DFL;
        for (size_t k = 0; k < NFORWARDED; k++) sigaction(FORWARDED[k], &sa, NULL);
        sigaction(SIGCHLD, &sa, NULL);
        sigprocmask(SIG_SETMASK, &old, NULL);
        execvp(program[0], program);
        fprintf(stderr, "warmboot-init: cannot run %s: %s\n", program[0], strerror(errno));
        _exit(127);
    }

    /* 7. Hold no fd but stdio, so that when PROGRAM closes the control pipes (or dies) the owner sees EOF
     *    at once instead of when we exit. close_range needs Linux 5.9; fall back to a loop. */
    if (syscall(SYS_close_range, 3U, ~0U, 0U) < 0)
        for (int f = 3; f < 65536; f++) close(f);

    /* 8. Wait loop. Every wake-up reaps every reapable child first (PROGRAM and re-parented orphans: one
     *    SIGCHLD may stand for several deaths), then forwards the signal that woke us. */
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&set, &info);
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
            if (pid == child) return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
        if (sig > 0 && sig != SIGCHLD) kill(child, sig);
    }
}
