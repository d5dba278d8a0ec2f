/*
 * cvmgcm: the emulated secure processor's per-page AES-256-GCM, one call per bundle.
 *
 * The migration stream seals every 4 KiB page with its own IV and AAD (header || GPA entry), so a page
 * cannot move to another address or bundle. Through Python each page costs one call into `cryptography`
 * (~1.3 us here, most of it per-call overhead); this shim runs the same OpenSSL EVP calls for a whole
 * bundle in one foreign call (ctypes releases the GIL around it). Same cipher, same bytes: the Python path
 * stays as the fallback and the tests check both give identical output.
 *
 * No OpenSSL headers and no link-time libcrypto: cvm_gcm_bind() opens the libcrypto the caller names
 * (native_gcm.py picks the newest OpenSSL 3 on the machine: Debian's 3.0 has no VAES/AVX-512 AES-GCM and
 * seals a page in 1.1 us where 3.5 takes 0.46 on the same Xeon) and takes the handful of EVP functions
 * below from it, which are OpenSSL 3's stable public ABI.
 */
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;

typedef EVP_CIPHER_CTX *(*ctx_new_fn)(void);
typedef void (*ctx_free_fn)(EVP_CIPHER_CTX *ctx);
typedef const EVP_CIPHER *(*cipher_fn)(void);
typedef int (*init_fn)(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl, const unsigned char *key,
                       const unsigned char *iv);
typedef int (*update_fn)(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
typedef int (*final_fn)(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
typedef int (*ctrl_fn)(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);
typedef unsigned long (*version_fn)(void);

static struct {
    ctx_new_fn ctx_new; /* set last: non-NULL means the whole table is bound */
    ctx_free_fn ctx_free;
    cipher_fn aes_256_gcm;
    init_fn encrypt_init;
    update_fn encrypt_update;
    final_fn encrypt_final;
    init_fn decrypt_init;
    update_fn decrypt_update;
    final_fn decrypt_final;
    ctrl_fn ctrl;
    version_fn version_num;
} evp;

/* POSIX lets a dlsym() result be converted to a function pointer; uintptr_t keeps -Wpedantic quiet. */
#define CVM_FN(type, ptr) ((type)(uintptr_t)(ptr))

/*
 * Bind to the libcrypto at `path`, once per process (a second call is refused, so the functions a running
 * seal uses never change under it). Returns its OpenSSL_version_num(), or 0 if it is bound already, cannot be
 * opened or lacks a function (then nothing is bound by this call, and unbound seal/open calls fail with -1).
 */
unsigned long cvm_gcm_bind(const char *path)
{
    static const char *const names[] = {
        "EVP_CIPHER_CTX_new",  "EVP_CIPHER_CTX_free", "EVP_aes_256_gcm",     "EVP_EncryptInit_ex",
        "EVP_EncryptUpdate",   "EVP_EncryptFinal_ex", "EVP_DecryptInit_ex",  "EVP_DecryptUpdate",
        "EVP_DecryptFinal_ex", "EVP_CIPHER_CTX_ctrl", "OpenSSL_version_num",
    };
    void *sym[sizeof(names) / sizeof(names[0])];
    if (evp.ctx_new != NULL)
        return 0;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL)
        return 0;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if ((sym[i] = dlsym(lib, names[i])) == NULL) {
            dlclose(lib);
            return 0;
        }
    }
    evp.ctx_free = CVM_FN(ctx_free_fn, sym[1]);
    evp.aes_256_gcm = CVM_FN(cipher_fn, sym[2]);
    evp.encrypt_init = CVM_FN(init_fn, sym[3]);
    evp.encrypt_update = CVM_FN(update_fn, sym[4]);
    evp.encrypt_final = CVM_FN(final_fn, sym[5]);
    evp.decrypt_init = CVM_FN(init_fn, sym[6]);
    evp.decrypt_update = CVM_FN(update_fn, sym[7]);
    evp.decrypt_final = CVM_FN(final_fn, sym[8]);
    evp.ctrl = CVM_FN(ctrl_fn, sym[9]);
    evp.version_num = CVM_FN(version_fn, sym[10]);
    evp.ctx_new = CVM_FN(ctx_new_fn, sym[0]);
    return evp.version_num();
}

#define CVM_PAGE 4096
#define CVM_TAG 16
#define CVM_IV 12 /* GCM's default IV length: no EVP_CTRL_GCM_SET_IVLEN needed */
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

/*
 * Seal n pages: page i (at address pages[i]) with IV ivs[12i..], AAD aads[aad_len*i..], into
 * out[(4096+16)*i..] as ciphertext || tag. Returns 0, or -1 if OpenSSL failed (nothing to trust in out).
 */
int cvm_gcm_seal_pages(const uint8_t *key, size_t n, const uint8_t *ivs, const uint64_t *pages, const uint8_t *aads,
                       size_t aad_len, uint8_t *out)
{
    EVP_CIPHER_CTX *ctx = evp.ctx_new != NULL ? evp.ctx_new() : NULL;
    if (ctx == NULL)
        return -1;
    int ok = evp.encrypt_init(ctx, evp.aes_256_gcm(), NULL, key, NULL) == 1;
    for (size_t i = 0; ok && i < n; i++) {
        uint8_t *unit = out + (CVM_PAGE + CVM_TAG) * i;
        const uint8_t *page = (const uint8_t *)(uintptr_t)pages[i];
        int len = 0;
        ok = evp.encrypt_init(ctx, NULL, NULL, NULL, ivs + CVM_IV * i) == 1 &&
             evp.encrypt_update(ctx, NULL, &len, aads + aad_len * i, (int)aad_len) == 1 &&
             evp.encrypt_update(ctx, unit, &len, page, CVM_PAGE) == 1 && len == CVM_PAGE &&
             evp.encrypt_final(ctx, unit + CVM_PAGE, &len) == 1 && len == 0 &&
             evp.ctrl(ctx, EVP_CTRL_GCM_GET_TAG, CVM_TAG, unit + CVM_PAGE) == 1;
    }
    evp.ctx_free(ctx);
    return ok ? 0 : -1;
}

/*
 * Open n sealed units (in[(4096+16)*i..], ciphertext || tag) into the pages at outs[i]. Returns 0 when every
 * tag verified, 1 at the first that did not (the caller must discard all outputs), -1 if OpenSSL failed.
 */
int cvm_gcm_open_pages(const uint8_t *key, size_t n, const uint8_t *ivs, const uint8_t *in, const uint8_t *aads,
                       size_t aad_len, const uint64_t *outs)
{
    EVP_CIPHER_CTX *ctx = evp.ctx_new != NULL ? evp.ctx_new() : NULL;
    if (ctx == NULL)
        return -1;
    int rc = evp.decrypt_init(ctx, evp.aes_256_gcm(), NULL, key, NULL) == 1 ? 0 : -1;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const uint8_t *unit = in + (CVM_PAGE + CVM_TAG) * i;
        uint8_t *page = (uint8_t *)(uintptr_t)outs[i];
        uint8_t tag[CVM_TAG], final[CVM_TAG];
        int len = 0;
        for (int k = 0; k < CVM_TAG; k++)
            tag[k] = unit[CVM_PAGE + k];
        if (evp.decrypt_init(ctx, NULL, NULL, NULL, ivs + CVM_IV * i) != 1 ||
            evp.decrypt_update(ctx, NULL, &len, aads + aad_len * i, (int)aad_len) != 1 ||
            evp.decrypt_update(ctx, page, &len, unit, CVM_PAGE) != 1 || len != CVM_PAGE ||
            evp.ctrl(ctx, EVP_CTRL_GCM_SET_TAG, CVM_TAG, tag) != 1) {
            rc = -1;
            break;
        }
        if (evp.decrypt_final(ctx, final, &len) != 1)
            rc = 1; /* tag mismatch */
    }
    evp.ctx_free(ctx);
    return rc;
}
