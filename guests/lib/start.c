/* C entry: validate the multiboot handoff, then run the guest's workload. */
#include "guest.h"

void cvm_start(u32 magic, const struct multiboot_info *mbi);
extern void guest_halt_forever(void) __attribute__((noreturn));

void guest_exit(u32 code) {
    outl(EXIT_PORT, code);
    guest_halt_forever();
}

void cvm_start(u32 magic, const struct multiboot_info *mbi) {
    struct boot_env env;
    serial_init();
    if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
        kprintf("FATAL: not loaded by a multiboot loader (eax=%x)\n", magic);
        guest_exit(2);
    }
    env.cmdline = (mbi->flags & MULTIBOOT_INFO_CMDLINE) ? (const char *)mbi->cmdline : "";
    env.mem_upper_kib = (mbi->flags & MULTIBOOT_INFO_MEMORY) ? mbi->mem_upper : 0;
    env.kernel_end = (u32)_kernel_end;
    clock_init(env.cmdline);
    guest_main(&env);
    guest_exit(0);
}
