/* The `vps exec` race (runc's CVE-2016-9962): scans /proc in a tight loop
 * and PTRACE_SEIZEs every new process it sees. For each it prints
 *   caught PID COMM CAPEFF   (seized: it could read and write that process;
 *                             CapEff in hex as /proc/PID/status shows it)
 *   missed PID COMM ERRNO
 * The helper that enters the VPS is called ferry-agent until it execs the
 * command. Usage: racer SECONDS OUTFILE. Built static by agent/tests/isolation.rs. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <time.h>
#include <unistd.h>

static unsigned char seen[1 << 22];

static void capeff_of(int pid, char *out, size_t n) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    snprintf(out, n, "?");
    if (!f) return;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "CapEff:", 7) == 0) {
            snprintf(out, n, "%s", line + 8);
            out[strcspn(out, "\n")] = 0;
        }
    fclose(f);
}

static void comm_of(int pid, char *out, size_t n) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", pid);
    FILE *f = fopen(path, "r");
    out[0] = 0;
    if (f) {
        if (fgets(out, (int)n, f)) out[strcspn(out, "\n")] = 0;
        fclose(f);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    time_t end = time(NULL) + atoi(argv[1]);
    FILE *out = fopen(argv[2], "w");
    if (!out) return 2;
    int self = getpid();
    while (time(NULL) < end) {
        DIR *d = opendir("/proc");
        if (!d) return 2;
        struct dirent *e;
        while ((e = readdir(d))) {
            int pid = atoi(e->d_name);
            if (pid <= 1 || pid == self || pid >= (int)sizeof seen || seen[pid]) continue;
            seen[pid] = 1;
            char comm[32], caps[64];
            if (ptrace(PTRACE_SEIZE, pid, 0, 0) == 0) {
                capeff_of(pid, caps, sizeof caps);
                comm_of(pid, comm, sizeof comm);
                fprintf(out, "caught %d %s %s\n", pid, comm, caps);
            } else {
                int err = errno;
                comm_of(pid, comm, sizeof comm);
                fprintf(out, "missed %d %s %s\n", pid, comm, strerrorname_np(err));
            }
            fflush(out);
        }
        closedir(d);
    }
    fclose(out);
    return 0;
}
