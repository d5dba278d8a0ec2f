/* kvstore: a key-value store in guest memory, serving GET/PUT/DELETE through the cvm-io device.
 *
 * Command line: slots=N (table size; default: a quarter of the RAM above the table's base, at most
 *               1,000,000)  base=GPA (table address, default 0x400000)  hb_ms=N (heartbeat period, default 1000)
 *               se_ms=N (how often it reads its Scheduled Events document, default 100; 0: never)
 *               se_approve=0|1 (approve every Scheduled event early, default 1)
 *
 * Requests and responses (little-endian; cvmotion.vmm.workloads.KvClient builds them):
 *   request  = u8 op | u8 key_len | u16 value_len | key[key_len] | value[value_len]
 *   response = u8 status | u8 0 | u16 value_len | value[value_len]
 *   op: 1 GET, 2 PUT, 3 DELETE, 4 STATS (value = u32 keys | u32 slots | u64 ops), 5 BLOB (request
 *       value = u32 blob kind; the response carries the host mailbox blob fetched with GET_BLOB)
 *   status: 0 OK, 1 NOT_FOUND, 2 FULL, 3 BAD_REQUEST, 4 NO_BLOB, 5 TOO_BIG
 * The table is fixed-size open addressing (FNV-1a, linear probing, tombstones on DELETE).  A PUT is
 * stored in the table before its COMPLETE is posted, so every acknowledged PUT lives in guest memory
 * and survives anything that preserves guest memory (pause, snapshot, migration).
 *
 * The table is not cleared at boot: the RAM above the image is zero when the guest starts (cvmotion's
 * loader hands over an empty memfd, QEMU fresh anonymous memory), and clearing it would populate every
 * page of a table sized from a full SKU's memory, which a live migration would then have to carry.
 *
 * Scheduled Events (Azure IMDS's document, which the host puts in the cvm-io mailbox, kind
 * CVMIO_BLOB_SCHEDULED_EVENTS): every se_ms the guest reads it; on a new DocumentIncarnation it prints
 *   SE incarnation=N events=K
 *   SE event id=ID type=Freeze|Reboot|Redeploy status=Scheduled|Started
 * and, with se_approve=1, approves each Scheduled event at once by posting IMDS's StartRequests body
 * ({"StartRequests":[{"EventId":"ID"}]}) to the same mailbox kind (POST_BLOB), printing "SE approve ID".
 * The document is parsed as JSON (strings with escapes, any key order, unknown keys skipped); anything it
 * cannot parse is reported ("SE unreadable") and ignored.
 *
 * Without cvm-io (under QEMU: the ID register reads 0xFFFFFFFF) it says so and only heartbeats. */
#include "cvmio.h"

#define KEY_MAX 64u
#define VAL_MAX 1024u
#define SLOT_EMPTY 0u
#define SLOT_USED 1u
#define SLOT_TOMBSTONE 2u
#define SLOTS_MAX 1000000u

enum { OP_GET = 1, OP_PUT = 2, OP_DELETE = 3, OP_STATS = 4, OP_BLOB = 5 };
enum { KV_OK = 0, KV_NOT_FOUND = 1, KV_FULL = 2, KV_BAD_REQUEST = 3, KV_NO_BLOB = 4, KV_TOO_BIG = 5 };

struct slot {
    u8 state;
    u8 key_len;
    u16 value_len;
    u32 hash;
    u8 key[KEY_MAX];
    u8 value[VAL_MAX];
};

static struct slot *table;
static u32 nslots, nkeys;
static u64 nops;
static u8 buf[8192] __attribute__((aligned(4096)));
static u8 key[KEY_MAX];
static struct cvmio_desc desc, blob_desc, se_desc;

/* --- Scheduled Events -------------------------------------------------------------------------------- */

#define SE_DOC_MAX 8192u
#define SE_EVENTS_MAX 16u
#define SE_ID_MAX 129u

struct se_event {
    char id[SE_ID_MAX];
    char type[16];
    char status[16];
};

static char se_doc[SE_DOC_MAX + 1] __attribute__((aligned(4096)));
static char se_post[SE_EVENTS_MAX * (SE_ID_MAX + 16) + 32] __attribute__((aligned(64)));
static struct se_event se_events[SE_EVENTS_MAX];
static u64 se_incarnation;
static int se_seen;

static const char *json_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') p++;
    return p;
}

/* A JSON string at p: copies at most cap-1 bytes (escapes kept as the escaped character) into out, if any;
 * returns the byte after the closing quote, or NULL. */
static const char *json_str(const char *p, char *out, u32 cap) {
    u32 n = 0;
    if (*p++ != '"') return NULL;
    for (; *p && *p != '"'; p++) {
        if (*p == '\\' && !*++p) return NULL;
        if (out && n + 1 < cap) out[n++] = *p;
    }
    if (out && cap) out[n] = 0;
    return *p == '"' ? p + 1 : NULL;
}

/* Skips one JSON value (string, number, literal, array or object); NULL if malformed. */
static const char *json_skip(const char *p) {
    p = json_ws(p);
    if (*p == '"') return json_str(p, NULL, 0);
    if (*p == '[' || *p == '{') {
        char close = *p == '[' ? ']' : '}';
        p = json_ws(p + 1);
        if (*p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                if (!(p = json_str(json_ws(p), NULL, 0))) return NULL;
                p = json_ws(p);
                if (*p++ != ':') return NULL;
            }
            if (!(p = json_skip(p))) return NULL;
            p = json_ws(p);
            if (*p == close) return p + 1;
            if (*p++ != ',') return NULL;
            p = json_ws(p);
        }
    }
    const char *start = p;
    while (*p && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n') p++;
    return p > start ? p : NULL;
}

static int key_is(const char *key, const char *want) {
    usize n = strlen(want);
    return strlen(key) == n && memcmp(key, want, n) == 0;
}

/* One event object: EventId, EventType, EventStatus kept, every other key skipped. */
static const char *se_parse_event(const char *p, struct se_event *ev) {
    char key[32];
    p = json_ws(p);
    if (*p++ != '{') return NULL;
    ev->id[0] = ev->type[0] = ev->status[0] = 0;
    p = json_ws(p);
    if (*p == '}') return p + 1;
    for (;;) {
        if (!(p = json_str(json_ws(p), key, sizeof(key)))) return NULL;
        p = json_ws(p);
        if (*p++ != ':') return NULL;
        p = json_ws(p);
        if (key_is(key, "EventId")) p = json_str(p, ev->id, sizeof(ev->id));
        else if (key_is(key, "EventType")) p = json_str(p, ev->type, sizeof(ev->type));
        else if (key_is(key, "EventStatus")) p = json_str(p, ev->status, sizeof(ev->status));
        else p = json_skip(p);
        if (!p) return NULL;
        p = json_ws(p);
        if (*p == '}') return p + 1;
        if (*p++ != ',') return NULL;
    }
}

/* The document: {"DocumentIncarnation": N, "Events": [...]}; returns the number of events, or -1. */
static i32 se_parse(const char *p, u64 *incarnation) {
    char key[32];
    i32 count = 0;
    int have_inc = 0;
    p = json_ws(p);
    if (*p++ != '{') return -1;
    for (;;) {
        if (!(p = json_str(json_ws(p), key, sizeof(key)))) return -1;
        p = json_ws(p);
        if (*p++ != ':') return -1;
        p = json_ws(p);
        if (key_is(key, "DocumentIncarnation")) {
            u64 v = 0;
            if (*p < '0' || *p > '9') return -1;
            while (*p >= '0' && *p <= '9') v = v * 10 + (u64)(*p++ - '0');
            *incarnation = v;
            have_inc = 1;
        } else if (key_is(key, "Events")) {
            if (*p++ != '[') return -1;
            p = json_ws(p);
            if (*p == ']') {
                p++;
            } else {
                for (;;) {
                    struct se_event scratch;
                    struct se_event *ev = (u32)count < SE_EVENTS_MAX ? &se_events[count] : &scratch;
                    if (!(p = se_parse_event(p, ev))) return -1;
                    if ((u32)count < SE_EVENTS_MAX) count++;
                    p = json_ws(p);
                    if (*p == ']') { p++; break; }
                    if (*p++ != ',') return -1;
                }
            }
        } else if (!(p = json_skip(p))) {
            return -1;
        }
        p = json_ws(p);
        if (*p == '}') return have_inc ? count : -1;
        if (*p++ != ',') return -1;
    }
}

static void se_approve(i32 count) {
    u32 n = 0, approved = 0;
    const char *head = "{\"StartRequests\":[";
    memcpy(se_post, head, strlen(head));
    n = strlen(head);
    for (i32 i = 0; i < count; i++) {
        struct se_event *ev = &se_events[i];
        if (!key_is(ev->status, "Scheduled") || !ev->id[0]) continue;
        const char *pre = approved ? ",{\"EventId\":\"" : "{\"EventId\":\"";
        memcpy(se_post + n, pre, strlen(pre));
        n += strlen(pre);
        memcpy(se_post + n, ev->id, strlen(ev->id));
        n += strlen(ev->id);
        memcpy(se_post + n, "\"}", 2);
        n += 2;
        approved++;
        kprintf("SE approve %s\n", ev->id);
    }
    if (!approved) return;
    memcpy(se_post + n, "]}", 2);
    n += 2;
    se_desc.op = CVMIO_OP_POST_BLOB;
    se_desc.buf_gpa = (u32)se_post;
    se_desc.buf_len = sizeof(se_post);
    se_desc.len = n;
    se_desc.tag = CVMIO_BLOB_SCHEDULED_EVENTS;
    se_desc.timeout_ms = 0;
    u32 st = cvmio_call(&se_desc);
    if (st != CVMIO_ST_OK) kprintf("SE post status %u\n", st);
}

/* Reads the document; on a new incarnation, reports its events and approves what is scheduled. */
static void se_check(int approve) {
    se_desc.op = CVMIO_OP_GET_BLOB;
    se_desc.buf_gpa = (u32)se_doc;
    se_desc.buf_len = SE_DOC_MAX;
    se_desc.len = 0;
    se_desc.tag = CVMIO_BLOB_SCHEDULED_EVENTS;
    se_desc.timeout_ms = 0;
    if (cvmio_call(&se_desc) != CVMIO_ST_OK || se_desc.len > SE_DOC_MAX) return;
    se_doc[se_desc.len] = 0;
    u64 incarnation = 0;
    i32 count = se_parse(se_doc, &incarnation);
    if (count < 0) {
        if (!se_seen || se_incarnation != ~0ull) kprintf("SE unreadable (%u bytes)\n", se_desc.len);
        se_seen = 1;
        se_incarnation = ~0ull;
        return;
    }
    if (se_seen && incarnation == se_incarnation) return;
    se_seen = 1;
    se_incarnation = incarnation;
    kprintf("SE incarnation=%llu events=%d\n", incarnation, count);
    for (i32 i = 0; i < count; i++)
        kprintf("SE event id=%s type=%s status=%s\n", se_events[i].id, se_events[i].type, se_events[i].status);
    if (approve) se_approve(count);
}

static u32 fnv1a(const u8 *p, u32 n) {
    u32 h = 0x811C9DC5u;
    for (u32 i = 0; i < n; i++) h = (h ^ p[i]) * 0x01000193u;
    return h;
}

/* Returns the slot holding the key, or -1; *insert_at receives the first reusable slot on the probe
 * path (a tombstone or the terminating empty slot), or -1 if the table is full. */
static i32 lookup(const u8 *k, u32 klen, u32 h, i32 *insert_at) {
    *insert_at = -1;
    for (u32 n = 0, i = h % nslots; n < nslots; n++, i = (i + 1 == nslots) ? 0 : i + 1) {
        struct slot *s = &table[i];
        if (s->state == SLOT_EMPTY) {
            if (*insert_at < 0) *insert_at = (i32)i;
            return -1;
        }
        if (s->state == SLOT_TOMBSTONE) {
            if (*insert_at < 0) *insert_at = (i32)i;
        } else if (s->hash == h && s->key_len == klen && memcmp(s->key, k, klen) == 0) {
            return (i32)i;
        }
    }
    return -1;
}

static u32 respond(u8 status, const u8 *value, u32 vlen) {
    if (vlen && value != buf + 4) memcpy(buf + 4, value, vlen);
    buf[0] = status;
    buf[1] = 0;
    buf[2] = (u8)(vlen & 0xFF);
    buf[3] = (u8)(vlen >> 8);
    return 4 + vlen;
}

static u32 handle(u32 len) {
    if (len < 4) return respond(KV_BAD_REQUEST, NULL, 0);
    u32 op = buf[0], klen = buf[1], vlen = (u32)buf[2] | ((u32)buf[3] << 8);
    if (4 + klen + vlen != len || klen > KEY_MAX || vlen > VAL_MAX) return respond(KV_BAD_REQUEST, NULL, 0);
    memcpy(key, buf + 4, klen);
    const u8 *value = buf + 4 + klen;
    i32 at, found;
    u32 h = fnv1a(key, klen);
    nops++;
    switch (op) {
    case OP_GET:
        if (klen == 0 || vlen != 0) return respond(KV_BAD_REQUEST, NULL, 0);
        found = lookup(key, klen, h, &at);
        if (found < 0) return respond(KV_NOT_FOUND, NULL, 0);
        return respond(KV_OK, table[found].value, table[found].value_len);
    case OP_PUT: {
        if (klen == 0) return respond(KV_BAD_REQUEST, NULL, 0);
        found = lookup(key, klen, h, &at);
        struct slot *s;
        if (found >= 0) {
            s = &table[found];
        } else if (at >= 0) {
            s = &table[at];
            nkeys++;
        } else {
            return respond(KV_FULL, NULL, 0);
        }
        s->hash = h;
        s->key_len = (u8)klen;
        memcpy(s->key, key, klen);
        memcpy(s->value, value, vlen);
        s->value_len = (u16)vlen;
        barrier();
        s->state = SLOT_USED; /* stored before the COMPLETE that acknowledges it */
        return respond(KV_OK, NULL, 0);
    }
    case OP_DELETE:
        if (klen == 0 || vlen != 0) return respond(KV_BAD_REQUEST, NULL, 0);
        found = lookup(key, klen, h, &at);
        if (found < 0) return respond(KV_NOT_FOUND, NULL, 0);
        table[found].state = SLOT_TOMBSTONE;
        nkeys--;
        return respond(KV_OK, NULL, 0);
    case OP_STATS: {
        u8 out[16];
        memcpy(out, &nkeys, 4);
        memcpy(out + 4, &nslots, 4);
        memcpy(out + 8, &nops, 8);
        return respond(KV_OK, out, sizeof(out));
    }
    case OP_BLOB: {
        u32 kind;
        if (vlen != 4) return respond(KV_BAD_REQUEST, NULL, 0);
        memcpy(&kind, value, 4);
        blob_desc.op = CVMIO_OP_GET_BLOB;
        blob_desc.buf_gpa = (u32)(buf + 4);
        blob_desc.buf_len = sizeof(buf) - 4;
        blob_desc.len = 0;
        blob_desc.tag = kind;
        blob_desc.timeout_ms = 0;
        u32 st = cvmio_call(&blob_desc);
        if (st == CVMIO_ST_NOT_FOUND) return respond(KV_NO_BLOB, NULL, 0);
        if (st != CVMIO_ST_OK || blob_desc.len > 0xFFFFu) return respond(KV_TOO_BIG, NULL, 0);
        return respond(KV_OK, buf + 4, blob_desc.len);
    }
    default:
        return respond(KV_BAD_REQUEST, NULL, 0);
    }
}

void guest_main(const struct boot_env *env) {
    const char *cl = env->cmdline;
    u32 base = (u32)cmdline_u64(cl, "base", 0x400000);
    u32 hb_ms = (u32)cmdline_u64(cl, "hb_ms", 1000);
    u64 ram_end = 0x100000ull + (u64)env->mem_upper_kib * 1024u;
    /* A quarter of the RAM above the base by default: a 64 MiB VM holds ~14,000 keys, a full SKU the cap. */
    u64 fit = ram_end > base ? (ram_end - base) / 4u / sizeof(struct slot) : 0;
    nslots = (u32)cmdline_u64(cl, "slots", fit < SLOTS_MAX ? fit : SLOTS_MAX);
    if (nslots == 0 || nslots > SLOTS_MAX || base < env->kernel_end ||
        (u64)base + (u64)nslots * sizeof(struct slot) > ram_end) {
        kprintf("kvstore: FATAL %u slots at 0x%x do not fit RAM ending at 0x%llx\n", nslots, base, ram_end);
        guest_exit(3);
    }
    table = (struct slot *)base;
    u64 hb_ticks = clock_ms_to_ticks(hb_ms ? hb_ms : 1);
    u64 next_hb = rdtsc() + hb_ticks;
    u32 seq = 0;
    u32 se_ms = (u32)cmdline_u64(cl, "se_ms", 100);
    int se_on_approve = cmdline_u64(cl, "se_approve", 1) != 0;
    u64 se_ticks = clock_ms_to_ticks(se_ms ? se_ms : 1);
    u64 next_se = rdtsc();

    if (!cvmio_present()) {
        kprintf("kvstore: cvm-io device absent (ID reads 0x%x): serving nothing, heartbeat only\n",
                inl(CVMIO_PORT + CVMIO_REG_ID));
        for (;;) {
            if (rdtsc() >= next_hb) {
                kprintf("HB seq=%u ops=0 keys=0\n", seq++);
                next_hb += hb_ticks;
            }
            cpu_relax();
        }
    }
    kprintf("kvstore: ready slots=%u base=0x%x slot_size=%u\n", nslots, base, (u32)sizeof(struct slot));
    for (;;) {
        u64 now = rdtsc();
        if (now >= next_hb) {
            kprintf("HB seq=%u ops=%llu keys=%u\n", seq++, nops, nkeys);
            next_hb = now + hb_ticks;
        }
        if (se_ms && now >= next_se) {
            se_check(se_on_approve);
            next_se = rdtsc() + se_ticks;
        }
        desc.op = CVMIO_OP_WAIT_REQUEST;
        desc.buf_gpa = (u32)buf;
        desc.buf_len = sizeof(buf);
        desc.len = 0;
        desc.tag = 0;
        desc.timeout_ms = hb_ms < 200 ? hb_ms : 200;
        if (se_ms && desc.timeout_ms > se_ms) desc.timeout_ms = se_ms;
        u32 st = cvmio_call(&desc);
        if (st == CVMIO_ST_RETRY) continue;
        if (st != CVMIO_ST_OK) {
            kprintf("kvstore: WAIT_REQUEST status %u\n", st);
            continue;
        }
        u32 rlen = handle(desc.len);
        desc.op = CVMIO_OP_COMPLETE;
        desc.len = rlen;
        st = cvmio_call(&desc);
        if (st != CVMIO_ST_OK && st != CVMIO_ST_BAD_TAG) kprintf("kvstore: COMPLETE status %u\n", st);
    }
}
