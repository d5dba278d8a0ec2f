/* memdirty: dirties a working set at a chosen rate and prints a verifiable running checksum.
 *
 * Command line (multiboot): dirty_mib=N (default 4)  rate=PAGES_PER_S (0 = as fast as it can, default)
 *   seed=N (default 1)  hb_ms=N (heartbeat period, default 200)  base=GPA (default 0x400000)
 *   max_writes=N (0 = forever; otherwise print DONE and exit with code 0)
 *   halt=1: with a rate, halt between writes (LAPIC TSC-deadline timer) instead of spinning on the TSC, as an
 *   idle OS does: the vCPU then costs the host nothing between writes (default 0: spin)
 *
 * Phase 1 touches every page of the working set (populating it): word 0 of page i = (i << 10) ^ mix32(seed);
 * the other words keep their boot value, zero.
 * Phase 2 repeats, for write number w = 0, 1, 2, ...:
 *     r = xorshift32(state)            state starts at (seed ^ 0x9E3779B9) or 1 if that is 0
 *     page p = r % pages,  word k = (r >> 22) & 1023
 *     v = mix32(mem[p][k] ^ (u32)w ^ seed);  mem[p][k] = v;  csum = rotl32(csum, 5) ^ v
 * so the checksum depends on every earlier write *and* on guest memory: a guest restarted from scratch
 * or resumed over lost or stale memory prints a different csum than the model
 * (cvmotion.vmm.workloads.MemdirtyModel) computes for the same write count.
 *
 * Heartbeats, at most one per hb_ms:  "HB seq=<n> writes=<n> csum=<8 hex>" */
#include "guest.h"

static u32 xorshift32(u32 *s) {
    u32 x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

static u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

void guest_main(const struct boot_env *env) {
    const char *cl = env->cmdline;
    u32 dirty_mib = (u32)cmdline_u64(cl, "dirty_mib", 4);
    u64 rate = cmdline_u64(cl, "rate", 0);
    u32 seed = (u32)cmdline_u64(cl, "seed", 1);
    u32 hb_ms = (u32)cmdline_u64(cl, "hb_ms", 200);
    u32 base = (u32)cmdline_u64(cl, "base", 0x400000);
    u64 max_writes = cmdline_u64(cl, "max_writes", 0);
    u64 halt = cmdline_u64(cl, "halt", 0);
    u64 ram_end = 0x100000ull + (u64)env->mem_upper_kib * 1024u;
    u32 pages = dirty_mib * 256u;

    if (pages == 0 || dirty_mib > 2048u) {
        kprintf("memdirty: FATAL dirty_mib=%u must be 1..2048\n", dirty_mib);
        guest_exit(3);
    }
    if ((base & (PAGE_SIZE - 1)) || base < env->kernel_end || (u64)base + (u64)pages * PAGE_SIZE > ram_end) {
        kprintf("memdirty: FATAL working set 0x%x + %u MiB does not fit RAM ending at 0x%llx (kernel ends 0x%x)\n",
                base, dirty_mib, ram_end, env->kernel_end);
        guest_exit(3);
    }
    kprintf("memdirty: start dirty_mib=%u rate=%llu seed=%u hb_ms=%u base=0x%x pages=%u tsc_hz=%llu\n", dirty_mib,
            rate, seed, hb_ms, base, pages, clock_hz());

    volatile u32 *mem = (volatile u32 *)base;
    u32 fill = mix32(seed);
    for (u32 i = 0; i < pages; i++) {
        mem[i * 1024u] = (i << 10) ^ fill;
    }
    kprintf("memdirty: ready pages=%u\n", pages);
    if (halt && rate) {
        kprintf(idle_init() ? "memdirty: halting between writes (TSC-deadline timer)\n"
                            : "memdirty: no TSC-deadline timer: spinning between writes\n");
    }

    u32 state = seed ^ 0x9E3779B9u;
    if (state == 0) state = 1;
    u32 csum = 0, seq = 0;
    u64 writes = 0;
    u64 hz = clock_hz();
    u64 hb_ticks = clock_ms_to_ticks(hb_ms ? hb_ms : 1);
    u64 ticks_per_write = rate ? hz / rate : 0;
    if (rate && ticks_per_write == 0) ticks_per_write = 1;
    u64 now = rdtsc();
    u64 next_hb = now + hb_ticks;
    u64 next_write = now;
    u64 max_lag = hz / 10; /* behind by more than 100 ms (a pause, a restore): do not burst to catch up */

    for (;;) {
        if ((rate || (writes & 0xFFFu) == 0)) {
            now = rdtsc();
            if (now >= next_hb) {
                kprintf("HB seq=%u writes=%llu csum=%08x\n", seq++, writes, csum);
                next_hb = now + hb_ticks;
            }
            if (rate) {
                if (now < next_write) {
                    if (halt) {
                        idle_until(next_write < next_hb ? next_write : next_hb);
                    } else {
                        cpu_relax();
                    }
                    continue;
                }
                if (now - next_write > max_lag) next_write = now;
                next_write += ticks_per_write;
            }
        }
        u32 r = xorshift32(&state);
        u32 p = r % pages;
        u32 k = (r >> 22) & 1023u;
        volatile u32 *word = &mem[p * 1024u + k];
        u32 v = mix32(*word ^ (u32)writes ^ seed);
        *word = v;
        csum = ((csum << 5) | (csum >> 27)) ^ v;
        writes++;
        if (max_writes && writes == max_writes) {
            kprintf("DONE writes=%llu csum=%08x\n", writes, csum);
            guest_exit(0);
        }
    }
}
