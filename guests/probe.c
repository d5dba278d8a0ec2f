/* probe: a test guest that does exactly what the host asks, so tests can check the VMM precisely.
 *
 * Command line: action=serve (default) | exit | halt | triple | spin   code=N (for exit)
 *   exit    writes `code` to the exit port (0xF4)
 *   halt    cli; hlt -- stopped for good with interrupts off
 *   triple  loads an empty IDT and executes ud2: #UD cannot be delivered, so #DF, then a triple fault
 *   spin    loops forever without any port I/O (a busy guest the VMM must still be able to pause)
 *   serve   answers cvm-io requests:  u8 op | u8 0 | u16 0 | u32 count | u32 gfn[count]
 *           op 1 TOUCH: write (gfn ^ 0x5A5A5A5A) into the first word of each page; reply u8 0 | 3x0
 *           op 2 READ:  reply u8 0 | 3x0 | u32 first-word[count]
 *           op 3 EXIT (gfn[0] = code), 4 HALT, 5 TRIPLE
 *           Pages below the end of the kernel image or above RAM are refused (reply status 3).
 * At boot it prints "probe: ready kernel_end=.. desc=.. buf=.. stack=.. ud2=.." so a test knows which
 * pages the guest itself dirties while serving (its descriptor, buffer and stack). */
#include "cvmio.h"

extern char stack_bottom[], stack_top[];
extern char probe_ud2[];

static struct cvmio_desc desc;
static u8 buf[8192] __attribute__((aligned(4096)));

static void do_halt(void) __attribute__((noreturn));
static void do_halt(void) {
    for (;;) __asm__ volatile("cli; hlt");
}

static void do_triple(void) __attribute__((noreturn));
static void do_triple(void) {
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) idtr = {0, 0};
    kprintf("probe: executing ud2 at %p with an empty IDT\n", (void *)probe_ud2);
    __asm__ volatile("lidt %0\n\t.global probe_ud2\nprobe_ud2:\n\tud2" : : "m"(idtr));
    __builtin_unreachable();
}

static void do_spin(void) __attribute__((noreturn));
static void do_spin(void) {
    volatile u32 counter = 0;
    for (;;) counter++;
}

static u32 serve_one(u32 len, u32 first_gfn, u32 end_gfn) {
    u32 op = buf[0], count;
    if (len < 8) return 0;
    memcpy(&count, buf + 4, 4);
    if (count > (sizeof(buf) - 8) / 4 || 8 + count * 4 != len) {
        buf[0] = 3;
        return 4;
    }
    u32 *gfns = (u32 *)(buf + 8);
    if (op == 1 || op == 2) {
        for (u32 i = 0; i < count; i++) {
            if (gfns[i] < first_gfn || gfns[i] >= end_gfn) {
                buf[0] = 3;
                return 4;
            }
        }
    }
    switch (op) {
    case 1:
        for (u32 i = 0; i < count; i++) *(volatile u32 *)(gfns[i] << 12) = gfns[i] ^ 0x5A5A5A5Au;
        buf[0] = 0;
        return 4;
    case 2:
        for (u32 i = 0; i < count; i++) gfns[i] = *(volatile u32 *)(gfns[i] << 12);
        buf[0] = 0;
        memcpy(buf + 4, buf + 8, count * 4);
        return 4 + count * 4;
    case 3:
        guest_exit(count ? gfns[0] : 0);
    case 4:
        do_halt();
    case 5:
        do_triple();
    default:
        buf[0] = 3;
        return 4;
    }
}

void guest_main(const struct boot_env *env) {
    char action[16];
    u32 sp;
    __asm__ volatile("mov %%esp, %0" : "=r"(sp));
    if (!cmdline_str(env->cmdline, "action", action, sizeof(action))) memcpy(action, "serve", 6);
    kprintf("probe: ready kernel_end=0x%x desc=%p buf=%p stack=0x%x..0x%x esp=0x%x ud2=%p action=%s\n",
            env->kernel_end, (void *)&desc, (void *)buf, (u32)stack_bottom, (u32)stack_top, sp, (void *)probe_ud2,
            action);
    if (memcmp(action, "exit", 5) == 0) guest_exit((u32)cmdline_u64(env->cmdline, "code", 0));
    if (memcmp(action, "halt", 5) == 0) do_halt();
    if (memcmp(action, "triple", 7) == 0) do_triple();
    if (memcmp(action, "spin", 5) == 0) do_spin();
    if (!cvmio_present()) {
        kprintf("probe: FATAL cvm-io device absent\n");
        guest_exit(4);
    }
    u32 first_gfn = env->kernel_end >> 12;
    u32 end_gfn = (u32)((0x100000ull + (u64)env->mem_upper_kib * 1024u) >> 12);
    for (;;) {
        desc.op = CVMIO_OP_WAIT_REQUEST;
        desc.buf_gpa = (u32)buf;
        desc.buf_len = sizeof(buf);
        desc.len = 0;
        desc.tag = 0;
        desc.timeout_ms = 200;
        if (cvmio_call(&desc) != CVMIO_ST_OK) continue;
        desc.len = serve_one(desc.len, first_gfn, end_gfn);
        desc.op = CVMIO_OP_COMPLETE;
        cvmio_call(&desc);
    }
}
