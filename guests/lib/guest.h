/* Tiny freestanding runtime shared by the cvmotion guests (-m32, no libc, no FPU/SSE).
 *
 * Everything a guest needs: fixed-width types, port I/O, the TSC clock, COM1 output, a printf subset,
 * multiboot command-line parsing and a clean exit.  Guests run single-threaded on the bootstrap
 * processor with interrupts disabled and poll; only idle.c installs an IDT (the LAPIC timer's vector,
 * to halt instead of spinning), so any CPU exception escalates to a triple fault (the VMM reports it
 * with the faulting RIP). */
#ifndef CVM_GUEST_H
#define CVM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef unsigned int usize;

#define NULL ((void *)0)
#define PAGE_SIZE 4096u

/* Multiboot v1 information structure (Multiboot Specification 0.6.96, section 3.3); only the fields
 * the guests read. */
struct multiboot_info {
    u32 flags;
    u32 mem_lower;
    u32 mem_upper;
    u32 boot_device;
    u32 cmdline;
    u32 mods_count;
    u32 mods_addr;
    u32 syms[4];
    u32 mmap_length;
    u32 mmap_addr;
};
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
#define MULTIBOOT_INFO_MEMORY 0x001u
#define MULTIBOOT_INFO_CMDLINE 0x004u

/* The "isa-debug-exit" convention: a 32-bit write to port 0xF4 ends the VM with that code.  cvmotion
 * implements it; QEMU does with `-device isa-debug-exit,iobase=0xf4,iosize=4`, and without the device
 * the write is ignored and the guest halts with interrupts off instead. */
#define EXIT_PORT 0xF4u

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 inl(u16 port) {
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void) {
    u64 v;
    __asm__ volatile("rdtsc" : "=A"(v));
    return v;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* Provided by each guest: the workload, given the parsed boot environment. */
struct boot_env {
    const char *cmdline; /* "image-name key=value ..." (the first token may be the kernel path) */
    u32 mem_upper_kib;   /* KiB of RAM above 1 MiB, from multiboot */
    u32 kernel_end;      /* first byte after the loaded image (page aligned) */
};
void guest_main(const struct boot_env *env);

/* start.c */
void guest_exit(u32 code) __attribute__((noreturn));
extern char _kernel_end[];

/* serial.c: COM1 at 0x3F8, 115200 8N1 */
void serial_init(void);
void serial_write(const char *s, usize n);

/* fmt.c: kprintf understands %s %c %u %d %x %08x %llu %llx %p and %%. */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* string.c: the compiler may emit calls to these even in freestanding code */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);

/* cmdline.c: "key=value" lookups; numbers are decimal or 0x-prefixed hex */
int cmdline_has(const char *cmdline, const char *key);
u64 cmdline_u64(const char *cmdline, const char *key, u64 fallback);
/* copies the value (NUL-terminated, at most cap-1 bytes) and returns 1, or returns 0 if absent */
int cmdline_str(const char *cmdline, const char *key, char *out, usize cap);

/* clock.c: TSC frequency from `tsc_khz=` (the VMM passes it) or calibrated against PIT channel 2 */
void clock_init(const char *cmdline);
u64 clock_hz(void);
u64 clock_ms_to_ticks(u32 ms);

/* idle.c: sleep until a TSC value (LAPIC TSC-deadline timer + HLT) instead of spinning on it.
 * idle_init() returns 1 when the CPU has the TSC-deadline timer (it then installs an IDT and arms the LAPIC's
 * timer vector), else 0 and idle_until() spins. */
int idle_init(void);
void idle_until(u64 tsc);

#endif
