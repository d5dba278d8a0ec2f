/* Multiboot v1 entry point shared by every guest (Multiboot Specification 0.6.96).
 *
 * The loader (cvmotion, QEMU -kernel, GRUB) enters here in 32-bit protected mode, paging off,
 * EAX = 0x2BADB002, EBX = physical address of the multiboot information structure.  Section 3.2 of
 * the spec leaves the GDT undefined, so we load our own flat one before touching a segment register. */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* bit 0: page-align modules, bit 1: we want mem_lower/mem_upper + mmap */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text
    .global _start
_start:
    cli
    cld
    lgdt gdt_descriptor
    ljmp $0x08, $1f
1:
    movw $0x10, %cx
    movw %cx, %ds
    movw %cx, %es
    movw %cx, %fs
    movw %cx, %gs
    movw %cx, %ss
    movl $stack_top, %esp
    xorl %ebp, %ebp
    pushl %ebx /* multiboot info address */
    pushl %eax /* multiboot magic */
    call cvm_start
    /* cvm_start never returns; if it does, stop for good with interrupts off. */
    .global guest_halt_forever
guest_halt_forever:
    cli
2:  hlt
    jmp 2b

    .section .rodata
    .align 8
gdt:
    .quad 0x0000000000000000 /* null */
    .quad 0x00CF9A000000FFFF /* 0x08: code, base 0, limit 4 GiB, 32-bit, execute/read */
    .quad 0x00CF92000000FFFF /* 0x10: data, base 0, limit 4 GiB, read/write */
gdt_descriptor:
    .word gdt_descriptor - gdt - 1
    .long gdt

    .section .bss
    .align 16
    .global stack_bottom
stack_bottom:
    .skip 16384
    .global stack_top
stack_top:

    .section .note.GNU-stack, "", @progbits
