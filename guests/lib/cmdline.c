/* Multiboot command-line parsing: whitespace-separated tokens, `key=value` pairs; tokens without '='
 * (QEMU and GRUB put the kernel path first) are ignored. */
#include "guest.h"

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* Returns a pointer to the value of `key`, or NULL; *len receives the value length. */
static const char *find(const char *cmdline, const char *key, usize *len) {
    usize klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p)) p++;
        const char *tok = p;
        while (*p && !is_space(*p)) p++;
        usize tlen = (usize)(p - tok);
        if (tlen > klen && tok[klen] == '=' && memcmp(tok, key, klen) == 0) {
            *len = tlen - klen - 1;
            return tok + klen + 1;
        }
    }
    return NULL;
}

int cmdline_has(const char *cmdline, const char *key) {
    usize len;
    return find(cmdline, key, &len) != NULL;
}

u64 cmdline_u64(const char *cmdline, const char *key, u64 fallback) {
    usize len;
    const char *v = find(cmdline, key, &len);
    if (!v || len == 0) return fallback;
    u64 out = 0;
    u32 base = 10;
    usize i = 0;
    if (len > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
        base = 16;
        i = 2;
    }
    for (; i < len; i++) {
        char c = v[i];
        u32 d;
        if (c >= '0' && c <= '9') d = (u32)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f') d = (u32)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F') d = (u32)(c - 'A' + 10);
        else return fallback; /* not a number: keep the default rather than guess */
        out = out * base + d;
    }
    return out;
}

int cmdline_str(const char *cmdline, const char *key, char *out, usize cap) {
    usize len;
    const char *v = find(cmdline, key, &len);
    if (!v || cap == 0) return 0;
    if (len > cap - 1) len = cap - 1;
    memcpy(out, v, len);
    out[len] = '\0';
    return 1;
}
