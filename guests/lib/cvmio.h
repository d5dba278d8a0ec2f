/* cvm-io: cvmotion's paravirtual request device.  This header is the wire contract; the host side is
 * cvmotion/vmm/devices/cvmio.py and its byte layout is pinned in cvmotion/abi/cvmio.py.
 *
 * Registers (x86 port I/O, 32-bit accesses, base CVMIO_PORT):
 *   IN  base+0  ID       reads CVMIO_ID ("CVIO"); an absent device reads 0xFFFFFFFF (QEMU, real PCs)
 *   IN  base+4  VERSION  reads CVMIO_VERSION
 *   OUT base+0  DOORBELL the guest-physical address of a struct cvmio_desc; the device processes it
 *                        before the OUT instruction completes (the descriptor is synchronous)
 *
 * Descriptor (32 bytes, little-endian, 8-byte aligned, must not cross a page):
 *   0x00 u16 op          CVMIO_OP_*
 *   0x02 u16 status      guest writes CVMIO_ST_PENDING; the device writes the result
 *   0x04 u32 flags       must be zero
 *   0x08 u64 buf_gpa     payload buffer (request/response bytes, blob bytes)
 *   0x10 u32 buf_len     capacity of the buffer
 *   0x14 u32 len         bytes valid: written by the device (WAIT_REQUEST, GET_BLOB), by the guest (COMPLETE,
 *                        POST_BLOB)
 *   0x18 u32 tag         request id (device writes on WAIT_REQUEST, guest echoes on COMPLETE); blob kind for
 *                        GET_BLOB and POST_BLOB
 *   0x1C u32 timeout_ms  WAIT_REQUEST: longest the device may block; it returns RETRY earlier whenever the
 *                        VMM wants to pause the vCPU, so a pause never waits for a request to arrive
 */
#ifndef CVM_CVMIO_H
#define CVM_CVMIO_H
#include "guest.h"

#define CVMIO_PORT 0x0CB0u
#define CVMIO_REG_ID 0u
#define CVMIO_REG_VERSION 4u
#define CVMIO_REG_DOORBELL 0u
#define CVMIO_ID 0x4F495643u /* "CVIO" */
#define CVMIO_VERSION 1u

#define CVMIO_OP_WAIT_REQUEST 1u /* block until the host queues a request; copy it into the buffer */
#define CVMIO_OP_COMPLETE 2u     /* post the response for `tag` (len bytes from the buffer) */
#define CVMIO_OP_GET_BLOB 3u     /* copy the host's mailbox blob of kind `tag` into the buffer */
#define CVMIO_OP_POST_BLOB 4u    /* hand the host `len` bytes for its mailbox of kind `tag` (at most 4096);
                                  * RETRY while the host has not taken earlier posts, NOT_FOUND for a kind
                                  * the host takes none of */

#define CVMIO_ST_OK 0u
#define CVMIO_ST_RETRY 1u      /* nothing within timeout_ms, or the VMM is pausing: call again */
#define CVMIO_ST_TOO_SMALL 2u  /* buffer too small; len holds the size needed */
#define CVMIO_ST_BAD_DESC 3u   /* malformed descriptor (flags, unknown op, buffer outside RAM) */
#define CVMIO_ST_NOT_FOUND 4u  /* no blob of that kind */
#define CVMIO_ST_BAD_TAG 5u    /* COMPLETE for a request the host no longer waits for */
#define CVMIO_ST_PENDING 0xFFFFu

#define CVMIO_BLOB_ATTESTATION_TOKEN 1u
#define CVMIO_BLOB_SCHEDULED_EVENTS 2u /* GET: the Scheduled Events document; POST: its StartRequests */

struct cvmio_desc {
    u16 op;
    u16 status;
    u32 flags;
    u64 buf_gpa;
    u32 buf_len;
    u32 len;
    u32 tag;
    u32 timeout_ms;
} __attribute__((packed, aligned(8)));

_Static_assert(sizeof(struct cvmio_desc) == 32, "cvmio_desc is 32 bytes");

int cvmio_present(void);
/* Rings the doorbell for `d` and returns d->status. */
u32 cvmio_call(struct cvmio_desc *d);

#endif
