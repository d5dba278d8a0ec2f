/* The four functions GCC may call behind our back even with -ffreestanding -fno-builtin. */
#include "guest.h"

/* REP STOSB / REP MOVSB: one instruction for the whole buffer, which matters when the hypervisor
 * emulates guest instructions one by one (this host's kvm_pvm does, for ring-0 code). */
void *memset(void *d, int c, usize n) {
    void *dst = d;
    __asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(c) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, usize n) {
    void *dst = d;
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(s), "+c"(n) : : "memory");
    return d;
}

int memcmp(const void *a, const void *b, usize n) {
    const u8 *x = a, *y = b;
    for (usize i = 0; i < n; i++) {
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    }
    return 0;
}

usize strlen(const char *s) {
    usize n = 0;
    while (s[n]) n++;
    return n;
}
