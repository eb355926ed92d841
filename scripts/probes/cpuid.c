/* Times one CPUID instruction: 1,000 of them in a loop. On a KVM guest
 * each one exits to the hypervisor (docs/PERFORMANCE.md, "What this VM
 * charges every process start").
 *
 *   gcc -O2 -o /tmp/cpuid scripts/probes/cpuid.c && /tmp/cpuid
 */
#include <cpuid.h>
#include <stdio.h>
#include <time.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(void) {
  unsigned a, b, c, d;
  double began = now_us();
  for (int i = 0; i < 1000; i++) {
    __cpuid_count(4, i & 3, a, b, c, d);
  }
  printf("cpuid: %.2f us each\n", (now_us() - began) / 1000);
  return 0;
}
