/* Counts the CPUID instructions a program runs from its execve to its
 * exit, by single-stepping it under ptrace and looking at the two bytes
 * at each instruction pointer (0F A2). Slow: about 40 s per million
 * instructions here (docs/PERFORMANCE.md, "What this VM charges every
 * process start").
 *
 *   gcc -O2 -o /tmp/cpuidcount scripts/probes/cpuidcount.c
 *   /tmp/cpuidcount /bin/bash -c true
 */
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: cpuidcount PROGRAM [ARGS...]\n");
    return 2;
  }
  pid_t child = fork();
  if (child < 0) {
    perror("fork");
    return 1;
  }
  if (child == 0) {
    ptrace(PTRACE_TRACEME, 0, 0, 0);
    execv(argv[1], argv + 1);
    perror(argv[1]);
    _exit(127);
  }
  int status;
  if (waitpid(child, &status, 0) < 0 || !WIFSTOPPED(status)) {
    fprintf(stderr, "%s did not start\n", argv[1]);
    return 1;
  }
  long steps = 0, cpuids = 0;
  for (;;) {
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, child, 0, &regs) == 0) {
      long word = ptrace(PTRACE_PEEKTEXT, child, (void *)regs.rip, 0);
      if ((word & 0xffff) == 0xa20f) cpuids++;
    }
    if (ptrace(PTRACE_SINGLESTEP, child, 0, 0) < 0) break;
    if (waitpid(child, &status, 0) < 0 || WIFEXITED(status) || WIFSIGNALED(status)) break;
    steps++;
  }
  fprintf(stderr, "%s: %ld instructions, %ld cpuid\n", argv[1], steps, cpuids);
  return 0;
}
