/* Loaded with LD_PRELOAD by benchmarks/cpu_kind.py: this process's CPUID says it has fewer instruction
 * sets than the CPU has, so that onnxruntime (and numpy) pick the kernels another CPU kind runs.
 *
 * FASHION_CPUID_MASK=vnni: no AMX and no AVX-VNNI (AVX-512 VNNI stays), as an AMD EPYC Zen 4.
 * FASHION_CPUID_MASK=avx2: no AVX-512, no VNNI of either kind, no AMX, as an AVX2-only CPU.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, the cpuid_fault flag) makes every CPUID
 * instruction of this thread, and of the threads it starts, raise SIGSEGV; the handler runs the real
 * CPUID with faulting briefly off, clears the masked bits of leaf 7 and steps over the instruction.
 * The constructor runs before any library's own initialisation reads CPUID (onnxruntime's MLAS reads
 * it when it is loaded). Code that tests XGETBV or /proc/cpuinfo alone is not fooled: the instructions
 * themselves still run, only what CPUID says changes. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* Bits cleared: leaf 7 subleaf 0 EBX, ECX, EDX; leaf 7 subleaf 1 EAX, EDX. */
static uint32_t mask_b, mask_c, mask_d, mask_1a, mask_1d;

static void on_fault(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)info;
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *at = (const unsigned char *)r[REG_RIP];
    if (at[0] != 0x0f || at[1] != 0xa2) { /* a real fault: let it end the process as it would */
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        b &= ~mask_b;
        c &= ~mask_c;
        d &= ~mask_d;
    } else if (leaf == 7 && sub == 1) {
        a &= ~mask_1a;
        d &= ~mask_1d;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    const char *kind = getenv("FASHION_CPUID_MASK");
    if (kind == NULL || *kind == '\0') return;
    const uint32_t amx = (1u << 22) | (1u << 24) | (1u << 25);   /* EDX: AMX-BF16, AMX-TILE, AMX-INT8 */
    const uint32_t avx_vnni = 1u << 4;                           /* 7.1 EAX: AVX-VNNI */
    const uint32_t avx_vnni_int = (1u << 4) | (1u << 10);        /* 7.1 EDX: AVX-VNNI-INT8, -INT16 */
    if (strcmp(kind, "vnni") == 0) {
        mask_d = amx | (1u << 23);                               /* and AVX512-FP16, which Zen 4 lacks */
        mask_1a = avx_vnni;
        mask_1d = avx_vnni_int;
    } else if (strcmp(kind, "avx2") == 0) {
        /* EBX: AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL; ECX: VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
         * EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, FP16; 7.1 EAX: AVX512-BF16 */
        mask_b = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31);
        mask_c = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
        mask_d = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 23) | amx;
        mask_1a = avx_vnni | (1u << 5);
        mask_1d = avx_vnni_int;
    } else {
        fprintf(stderr, "cpuid_mask: unknown FASHION_CPUID_MASK %s (expected vnni or avx2)\n", kind);
        _exit(2);
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("cpuid_mask: arch_prctl(ARCH_SET_CPUID)");
        _exit(2);
    }
}
