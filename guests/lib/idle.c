/* Sleeping until a TSC value instead of spinning on it: the local APIC timer in TSC-deadline mode.
 *
 * A guest that waits by polling the TSC keeps its vCPU running, so the host sees a busy core even when the
 * workload is idle (a real OS halts).  idle_until() arms the LAPIC timer's TSC-deadline mode (Intel SDM vol. 3A,
 * 11.5.4.1: LVT timer mode 10b, then IA32_TSC_DEADLINE, MSR 0x6E0) and halts with interrupts enabled; the timer
 * interrupt wakes the vCPU.  It needs CPUID.01H:ECX.TSC_Deadline[bit 24] (KVM's in-kernel LAPIC and QEMU with
 * KVM report it) and an IDT: idle_init() installs one whose only present gates are the timer and the
 * APIC's spurious vector; any exception still escalates to a triple fault, as in the guests without an IDT. */
#include "guest.h"

#define APIC_BASE 0xFEE00000u
#define APIC_EOI 0x0B0u
#define APIC_SVR 0x0F0u
#define APIC_LVT_TIMER 0x320u
#define APIC_SVR_ENABLE 0x100u
#define LVT_TSC_DEADLINE (2u << 17)
#define MSR_IA32_TSC_DEADLINE 0x6E0u
#define TIMER_VECTOR 0x40u
#define SPURIOUS_VECTOR 0xFFu
#define CPUID1_ECX_TSC_DEADLINE (1u << 24)

struct idt_gate {
    u16 offset_lo;
    u16 selector;
    u8 zero;
    u8 type; /* 0x8E: present, DPL 0, 32-bit interrupt gate */
    u16 offset_hi;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(8)));
static int enabled;

/* The timer's handler only acknowledges the interrupt: waking from HLT is its whole purpose.  Interrupts are
 * enabled only inside idle_until()'s "sti; hlt", so the interrupted instruction is always the one after HLT
 * (idle_woken): the handlers drop the interrupt frame (EIP, CS, EFLAGS: no privilege change) and jump there
 * with IF still clear, instead of IRET.  KVM's instruction emulator, which runs ring-0 guest code under
 * kvm_pvm, implements IRET in real mode only (arch/x86/kvm/emulate.c, em_iret). */
void idle_timer_isr(void);
void idle_spurious_isr(void);
__asm__(".text\n"
        ".globl idle_timer_isr\n"
        "idle_timer_isr:\n"
        "    movl $0, 0xFEE000B0\n" /* EOI */
        "    addl $12, %esp\n"
        "    jmp idle_woken\n"
        ".globl idle_spurious_isr\n"
        "idle_spurious_isr:\n" /* no EOI for the spurious vector (SDM 11.9) */
        "    addl $12, %esp\n"
        "    jmp idle_woken\n");

static inline void apic_write(u32 reg, u32 v) { *(volatile u32 *)(APIC_BASE + reg) = v; }
static inline u32 apic_read(u32 reg) { return *(volatile u32 *)(APIC_BASE + reg); }

static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static void set_gate(u32 vector, void (*handler)(void)) {
    u32 addr = (u32)handler;
    idt[vector].offset_lo = (u16)(addr & 0xFFFF);
    idt[vector].selector = 0x08; /* entry.S's flat code segment */
    idt[vector].zero = 0;
    idt[vector].type = 0x8E;
    idt[vector].offset_hi = (u16)(addr >> 16);
}

int idle_init(void) {
    u32 eax = 1, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx));
    if (!(ecx & CPUID1_ECX_TSC_DEADLINE)) return 0;
    set_gate(TIMER_VECTOR, idle_timer_isr);
    set_gate(SPURIOUS_VECTOR, idle_spurious_isr);
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u32)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* Mask the legacy 8259 PICs: under QEMU the BIOS left IRQ0 (its PIT tick) unmasked, and with interrupts
     * enabled it would arrive at a vector this IDT does not serve.  Only the LAPIC timer may wake the guest. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    apic_write(APIC_SVR, apic_read(APIC_SVR) | APIC_SVR_ENABLE | SPURIOUS_VECTOR);
    apic_write(APIC_LVT_TIMER, LVT_TSC_DEADLINE | TIMER_VECTOR);
    enabled = 1;
    return 1;
}

void idle_until(u64 tsc) {
    if (!enabled) {
        while (rdtsc() < tsc) cpu_relax();
        return;
    }
    wrmsr(MSR_IA32_TSC_DEADLINE, tsc);
    /* STI's one-instruction shadow makes "sti; hlt" atomic: a timer that fired in between still wakes HLT, and
     * no interrupt is taken anywhere but at idle_woken.  A wake for any other reason returns early: the caller
     * re-reads the TSC and loops. */
    __asm__ volatile("sti\n hlt\n .globl idle_woken\n idle_woken: cli" ::: "memory", "cc");
}
