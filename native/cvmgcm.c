/*
 * cvmgcm: the emulated secure processor's per-page AES-256-GCM, one call per bundle.
 *
 * The migration stream seals every 4 KiB page with its own IV and AAD (header || GPA entry), so a page
 * cannot move to another address or bundle. Through Python each page costs one call into `cryptography`
 * (~2.2 us here, about half of it per-call overhead); this shim runs the same OpenSSL EVP calls for a whole
 * bundle in one foreign call (ctypes releases the GIL around it). Same cipher, same bytes: the Python path
 * stays as the fallback and the tests check both give identical output.
 *
 * No OpenSSL headers are needed (only python3, gcc and make are assumed on a fresh machine): the handful of
 * EVP prototypes below are OpenSSL 3's stable public ABI, and the library is the libcrypto.so.3 that
 * Python's own ssl module uses.
 */
#include <stddef.h>
#include <stdint.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;

extern EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
extern void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
extern const EVP_CIPHER *EVP_aes_256_gcm(void);
extern int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl, const unsigned char *key,
                              const unsigned char *iv);
extern int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
extern int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
extern int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl, const unsigned char *key,
                              const unsigned char *iv);
extern int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
extern int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
extern int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);

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
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return -1;
    int ok = EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL) == 1;
    for (size_t i = 0; ok && i < n; i++) {
        uint8_t *unit = out + (CVM_PAGE + CVM_TAG) * i;
        const uint8_t *page = (const uint8_t *)(uintptr_t)pages[i];
        int len = 0;
        ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, ivs + CVM_IV * i) == 1 &&
             EVP_EncryptUpdate(ctx, NULL, &len, aads + aad_len * i, (int)aad_len) == 1 &&
             EVP_EncryptUpdate(ctx, unit, &len, page, CVM_PAGE) == 1 && len == CVM_PAGE &&
             EVP_EncryptFinal_ex(ctx, unit + CVM_PAGE, &len) == 1 && len == 0 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, CVM_TAG, unit + CVM_PAGE) == 1;
    }
    EVP_CIPHER_CTX_free(ctx);
    return ok ? 0 : -1;
}

/*
 * Open n sealed units (in[(4096+16)*i..], ciphertext || tag) into the pages at outs[i]. Returns 0 when every
 * tag verified, 1 at the first that did not (the caller must discard all outputs), -1 if OpenSSL failed.
 */
int cvm_gcm_open_pages(const uint8_t *key, size_t n, const uint8_t *ivs, const uint8_t *in, const uint8_t *aads,
                       size_t aad_len, const uint64_t *outs)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return -1;
    int rc = EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL) == 1 ? 0 : -1;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const uint8_t *unit = in + (CVM_PAGE + CVM_TAG) * i;
        uint8_t *page = (uint8_t *)(uintptr_t)outs[i];
        uint8_t tag[CVM_TAG], final[CVM_TAG];
        int len = 0;
        for (int k = 0; k < CVM_TAG; k++)
            tag[k] = unit[CVM_PAGE + k];
        if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, ivs + CVM_IV * i) != 1 ||
            EVP_DecryptUpdate(ctx, NULL, &len, aads + aad_len * i, (int)aad_len) != 1 ||
            EVP_DecryptUpdate(ctx, page, &len, unit, CVM_PAGE) != 1 || len != CVM_PAGE ||
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, CVM_TAG, tag) != 1) {
            rc = -1;
            break;
        }
        if (EVP_DecryptFinal_ex(ctx, final, &len) != 1)
            rc = 1; /* tag mismatch */
    }
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}
