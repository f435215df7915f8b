/* The C floor: what fork, _exit and waitpid cost with no Python in the way.
 *
 * usage: floor CALLS [RESIDENT_MIB [HUGEPAGES]]
 *
 * Holds RESIDENT_MIB of touched memory (advised for transparent huge pages when HUGEPAGES
 * is 1, as numpy does for large arrays), then times CALLS rounds of fork() -> child
 * _exit(0) -> parent waitpid(). Prints the per-call times in nanoseconds as a JSON array.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CALLS [RESIDENT_MIB [HUGEPAGES]]\n", argv[0]);
        return 2;
    }
    long calls = atol(argv[1]);
    size_t resident = argc > 2 ? (size_t)atol(argv[2]) << 20 : 0;
    int hugepages = argc > 3 && atoi(argv[3]) == 1;

    char *memory = NULL;
    if (resident > 0) {
        memory = mmap(NULL, resident, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
        if (memory == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        if (hugepages) {
            madvise(memory, resident, MADV_HUGEPAGE); /* advice only: may be refused */
        }
        memset(memory, 1, resident);
    }

    long long *times = calloc((size_t)calls, sizeof *times);
    if (times == NULL) {
        perror("calloc");
        return 1;
    }
    for (long i = 0; i < calls; i++) {
        long long start = now_ns();
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            _exit(0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) {
            perror("waitpid");
            return 1;
        }
        times[i] = now_ns() - start;
    }

    printf("[");
    for (long i = 0; i < calls; i++) {
        printf(i ? ",%lld" : "%lld", times[i]);
    }
    printf("]\n");
    /* Touch the memory once more so that no compiler can drop it as unused. */
    return memory != NULL && memory[resident - 1] != 1;
}
