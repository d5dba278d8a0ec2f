/* The guests' only clock is the TSC.  Its frequency comes from `tsc_khz=` on the command line (the
 * cvmotion VMM always passes it: KVM_GET_TSC_KHZ, or the host TSC rate under the emulator) or, under
 * plain QEMU/GRUB, from a 50 ms calibration against PIT channel 2 (the method Linux's
 * pit_calibrate_tsc() uses: gate channel 2 via port 0x61 and wait for OUT2). */
#include "guest.h"

#define PIT_HZ 1193182u
#define CALIBRATE_MS 50u
#define FALLBACK_KHZ 2000000u

static u64 tsc_hz;

static u32 pit_calibrate_khz(void) {
    u32 latch = PIT_HZ / (1000u / CALIBRATE_MS);
    outb(0x61, (u8)((inb(0x61) & ~0x02u) | 0x01u)); /* gate high, speaker off */
    outb(0x43, 0xB0);                               /* channel 2, lo/hi byte, mode 0, binary */
    outb(0x42, (u8)(latch & 0xFF));
    outb(0x42, (u8)(latch >> 8));
    u64 t0 = rdtsc();
    for (u32 i = 0; i < 50000000u; i++) {
        if (inb(0x61) & 0x20) {
            u64 t1 = rdtsc();
            return (u32)((t1 - t0) / CALIBRATE_MS);
        }
    }
    return 0;
}

void clock_init(const char *cmdline) {
    u64 khz = cmdline_u64(cmdline, "tsc_khz", 0);
    if (khz == 0) {
        khz = pit_calibrate_khz();
        /* A PIT that is absent reads 0xFF and "expires" at once; anything below 100 MHz is bogus. */
        if (khz < 100000u) {
            kprintf("clock: no tsc_khz= and no usable PIT, assuming %u kHz\n", FALLBACK_KHZ);
            khz = FALLBACK_KHZ;
        }
    }
    tsc_hz = khz * 1000u;
}

u64 clock_hz(void) { return tsc_hz; }

u64 clock_ms_to_ticks(u32 ms) { return tsc_hz / 1000u * ms; }
