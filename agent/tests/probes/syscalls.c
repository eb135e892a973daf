/* Calls each syscall the VPS seccomp filter denies, with arguments that
 * work (or fail other than EPERM) for an unconfined root, and prints
 * "NAME ok|EPERM|ERRNO" per call. Built static by agent/tests/isolation.rs. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/perf_event.h>
#include <linux/bpf.h>

static void report(const char *name, long rc) {
    printf("%s %s\n", name, rc >= 0 ? "ok" : (errno == EPERM ? "EPERM" : strerrorname_np(errno)));
}

int main(void) {
    union bpf_attr battr;
    memset(&battr, 0, sizeof battr);
    report("bpf", syscall(SYS_bpf, BPF_MAP_CREATE, &battr, sizeof battr));
    struct perf_event_attr pattr;
    memset(&pattr, 0, sizeof pattr);
    pattr.type = PERF_TYPE_SOFTWARE;
    pattr.size = sizeof pattr;
    pattr.config = PERF_COUNT_SW_CPU_CLOCK;
    report("perf_event_open", syscall(SYS_perf_event_open, &pattr, -1, 0, -1, 0));
    report("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 0));
    report("add_key", syscall(SYS_add_key, "user", "ferry-probe", "x", 1, -3));
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("kcmp", syscall(SYS_kcmp, getpid(), getpid(), 0 /* KCMP_FILE */, 0, 0));
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    return 0;
}
