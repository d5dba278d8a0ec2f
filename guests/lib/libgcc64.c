/* 64-bit unsigned division for -m32 without libgcc: GCC lowers `u64 / u64` and `u64 % u64` to these
 * helpers.  Restoring shift-subtract division; the guests divide rarely (rates, clock conversion). */
#include "guest.h"

u64 __udivmoddi4(u64 n, u64 d, u64 *rem);
u64 __udivdi3(u64 n, u64 d);
u64 __umoddi3(u64 n, u64 d);

u64 __udivmoddi4(u64 n, u64 d, u64 *rem) {
    u64 q = 0, r = 0;
    if (d == 0) {
        /* Division by zero: the hardware would raise #DE; make it visible instead of silently wrong. */
        __asm__ volatile("ud2");
    }
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1u);
        if (r >= d) {
            r -= d;
            q |= 1ull << i;
        }
    }
    if (rem) *rem = r;
    return q;
}

u64 __udivdi3(u64 n, u64 d) { return __udivmoddi4(n, d, NULL); }

u64 __umoddi3(u64 n, u64 d) {
    u64 r;
    __udivmoddi4(n, d, &r);
    return r;
}
