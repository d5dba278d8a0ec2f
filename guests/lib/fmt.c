/* kprintf: the printf subset the guests need, formatted into a line buffer and sent to COM1 in one go.
 * 64-bit decimal conversion uses the helpers in libgcc64.c. */
#include "guest.h"

#define OUT_CAP 256u

struct out {
    char buf[OUT_CAP];
    usize len;
};

static void put(struct out *o, char c) {
    if (o->len < OUT_CAP) o->buf[o->len++] = c;
}

static void put_unsigned(struct out *o, u64 v, u32 base, u32 width, char pad) {
    char tmp[24];
    u32 n = 0;
    /* 32-bit values use the native DIV: the 64-bit helper costs ~100x more, and under an emulating
     * hypervisor every instruction counts. */
    while (v >> 32) {
        u32 digit = (u32)(v % base);
        tmp[n++] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
        v /= base;
    }
    u32 w = (u32)v;
    do {
        u32 digit = w % base;
        tmp[n++] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
        w /= base;
    } while (w != 0 && n < sizeof(tmp));
    while (width > n) {
        put(o, pad);
        width--;
    }
    while (n) put(o, tmp[--n]);
}

void kprintf(const char *fmt, ...) {
    struct out o;
    __builtin_va_list ap;
    o.len = 0;
    __builtin_va_start(ap, fmt);
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            put(&o, *p);
            continue;
        }
        p++;
        char pad = ' ';
        u32 width = 0;
        int longlong = 0;
        if (*p == '0') {
            pad = '0';
            p++;
        }
        while (*p >= '0' && *p <= '9') width = width * 10 + (u32)(*p++ - '0');
        if (p[0] == 'l' && p[1] == 'l') {
            longlong = 1;
            p += 2;
        }
        switch (*p) {
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            while (*s) put(&o, *s++);
            break;
        }
        case 'c':
            put(&o, (char)__builtin_va_arg(ap, int));
            break;
        case 'd': {
            i32 v = __builtin_va_arg(ap, i32);
            if (v < 0) {
                put(&o, '-');
                put_unsigned(&o, (u64)(-(long long)v), 10, width, pad);
            } else {
                put_unsigned(&o, (u64)v, 10, width, pad);
            }
            break;
        }
        case 'u':
            put_unsigned(&o, longlong ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, width, pad);
            break;
        case 'x':
            put_unsigned(&o, longlong ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, width, pad);
            break;
        case 'p':
            put(&o, '0');
            put(&o, 'x');
            put_unsigned(&o, (u32)__builtin_va_arg(ap, void *), 16, 8, '0');
            break;
        case '%':
            put(&o, '%');
            break;
        default:
            put(&o, '?');
            break;
        }
        if (*p == '\0') break;
    }
    __builtin_va_end(ap);
    serial_write(o.buf, o.len);
}
