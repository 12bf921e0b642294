/* Loaded with LD_PRELOAD by benchmarks/cpu_kind.py: this process's CPUID says it has fewer instruction
 * sets than the CPU has, so that onnxruntime (and numpy) pick the kernels another CPU kind runs.
 *
 * FASHION_CPUID_MASK=vnni: no AMX and no AVX-VNNI (AVX-512 VNNI stays), as an AMD EPYC Zen 4.
 * FASHION_CPUID_MASK=avx2: no AVX-512 or AVX10, no VNNI of either kind, no AMX, as an AVX2-only CPU.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, the cpuid_fault flag) makes every CPUID
 * instruction of this thread, and of the threads it starts, raise SIGSEGV; the handler answers it
 * with the real CPUID (faulting briefly off) or, where this process may no longer call arch_prctl (a
 * sandboxed browser), from the answers read before faulting was turned on; clears the masked bits of
 * leaf 7 and steps over the instruction. The mask holds for code that reads CPUID after this
 * constructor: libraries loaded later (Python's extension modules, onnxruntime among them), not the
 * dynamic loader's own choices nor libraries an executable links directly. The program's own
 * SIGSEGV handlers, set through sigaction or signal (both wrapped), are kept aside and called for
 * every SIGSEGV that is not a CPUID's; one set by a raw rt_sigaction system call would replace the
 * mask's own. Code that tests XGETBV or /proc/cpuinfo alone is not fooled: the instructions
 * themselves still run, only what CPUID says changes. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef MASK_ENV
#define MASK_ENV "FASHION_CPUID_MASK"
#endif

/* Bits cleared: leaf 7 subleaf 0 EBX, ECX, EDX; leaf 7 subleaf 1 EAX, EDX. */
static uint32_t mask_b, mask_c, mask_d, mask_1a, mask_1d;
static int masking;

/* CPUID as read before faulting was on (on the CPU the constructor ran on: its APIC ids in leaves 1,
 * 0xB and 0x1F): basic leaves 0..39 and extended 0x80000000..+39, subleaves 0..19. */
#define LEAVES 40
#define SUBLEAVES 20
static uint32_t table[2][LEAVES][SUBLEAVES][4];

/* The program's own SIGSEGV disposition, which its sigaction/signal calls set in our stead. */
static struct sigaction program_action;
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;

static int call_real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (real_sigaction == NULL) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real_sigaction(sig, act, old);
}

static void cpuid_of(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1) == 0) {
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        return;
    }
    /* arch_prctl refused (a sandbox): the answer read before, or none for a leaf not read */
    int ext = (leaf & 0x80000000u) != 0;
    uint32_t index = leaf & 0x7fffffffu;
    if (index < LEAVES && sub < SUBLEAVES)
        memcpy(r, table[ext][index][sub], 4 * sizeof(uint32_t));
    else
        memset(r, 0, 4 * sizeof(uint32_t));
}

static void pass_on(int sig, siginfo_t *info, void *context) {
    /* a SIGSEGV that is not a CPUID's: the program's handler, or what its disposition does */
    struct sigaction program = program_action;
    int from_kernel = info != NULL && info->si_code > 0;
    if (program.sa_handler == SIG_IGN && !from_kernel) return;  /* a kill -SEGV the program ignores */
    if (program.sa_handler == SIG_DFL || program.sa_handler == SIG_IGN || program.sa_handler == SIG_ERR) {
        /* the default: a fault runs its instruction again, a sent signal is sent again; either ends
         * the process as SIGSEGV does (blocked in this handler, it arrives on return) */
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        call_real_sigaction(SIGSEGV, &fallback, NULL);
        if (!from_kernel) raise(sig);
        return;
    }
    if (program.sa_flags & SA_RESETHAND) {  /* a one-shot handler: the default after it */
        memset(&program_action, 0, sizeof program_action);
        program_action.sa_handler = SIG_DFL;
    }
    if (program.sa_flags & SA_SIGINFO)
        program.sa_sigaction(sig, info, context);
    else
        program.sa_handler(sig);
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    int saved_errno = errno;  /* a refused arch_prctl sets it */
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *at = (const unsigned char *)r[REG_RIP];
    /* CPUID faulting raises SIGSEGV from the kernel (SI_KERNEL) at the instruction 0f a2 */
    if (info == NULL || info->si_code != SI_KERNEL || at[0] != 0x0f || at[1] != 0xa2) {
        pass_on(sig, info, context);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX], v[4];
    cpuid_of(leaf, sub, v);
    if (leaf == 7 && sub == 0) {
        v[1] &= ~mask_b;
        v[2] &= ~mask_c;
        v[3] &= ~mask_d;
    } else if (leaf == 7 && sub == 1) {
        v[0] &= ~mask_1a;
        v[3] &= ~mask_1d;
    }
    r[REG_RAX] = v[0];
    r[REG_RBX] = v[1];
    r[REG_RCX] = v[2];
    r[REG_RDX] = v[3];
    r[REG_RIP] += 2;
    errno = saved_errno;
}

/* The program sets SIGSEGV's disposition: kept as its own, while on_fault stays installed. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!masking || sig != SIGSEGV) return call_real_sigaction(sig, act, old);
    struct sigaction wanted;
    if (act != NULL) wanted = *act;  /* act and old may be one struct */
    if (old != NULL) *old = program_action;
    if (act != NULL) program_action = wanted;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    const char *kind = getenv(MASK_ENV);
    if (kind == NULL || *kind == '\0') return;
    const uint32_t amx = (1u << 22) | (1u << 24) | (1u << 25);   /* EDX: AMX-BF16, AMX-TILE, AMX-INT8 */
    const uint32_t avx_vnni = 1u << 4;                           /* 7.1 EAX: AVX-VNNI */
    const uint32_t avx_vnni_int = (1u << 4) | (1u << 10);        /* 7.1 EDX: AVX-VNNI-INT8, -INT16 */
    const uint32_t amx_more = (1u << 21);                        /* 7.1 EAX: AMX-FP16 */
    const uint32_t amx_complex = (1u << 8);                      /* 7.1 EDX: AMX-COMPLEX */
    if (strcmp(kind, "vnni") == 0) {
        mask_d = amx | (1u << 23);                               /* and AVX512-FP16, which Zen 4 lacks */
        mask_1a = avx_vnni | amx_more;
        mask_1d = avx_vnni_int | amx_complex | (1u << 19);       /* and AVX10, which needs FP16 */
    } else if (strcmp(kind, "avx2") == 0) {
        /* EBX: AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL; ECX: VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
         * EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, FP16; 7.1 EAX: AVX512-BF16; 7.1 EDX: AVX10 */
        mask_b = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31);
        mask_c = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
        mask_d = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 23) | amx;
        mask_1a = avx_vnni | (1u << 5) | amx_more;
        mask_1d = avx_vnni_int | amx_complex | (1u << 19);
    } else {
        fprintf(stderr, "cpuid_mask: unknown %s %s (expected vnni or avx2)\n", MASK_ENV, kind);
        _exit(2);
    }
    for (int ext = 0; ext < 2; ext++)
        for (uint32_t leaf = 0; leaf < LEAVES; leaf++)
            for (uint32_t sub = 0; sub < SUBLEAVES; sub++) {
                uint32_t *t = table[ext][leaf][sub];
                __cpuid_count((ext ? 0x80000000u : 0u) | leaf, sub, t[0], t[1], t[2], t[3]);
            }
    call_real_sigaction(SIGSEGV, NULL, &program_action);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    /* not SA_ONSTACK: a thread may keep an alternate stack it no longer owns (a whole-suite run under
     * the avx2 mask crashed in the segmentation benchmark with it, and passes without) */
    action.sa_flags = SA_SIGINFO;
    sigfillset(&action.sa_mask);  /* no other handler runs while CPUID is briefly allowed */
    call_real_sigaction(SIGSEGV, &action, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("cpuid_mask: arch_prctl(ARCH_SET_CPUID)");
        _exit(2);
    }
    masking = 1;
}
