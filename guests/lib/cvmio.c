/* cvm-io guest driver: presence probe and the synchronous doorbell. */
#include "cvmio.h"

int cvmio_present(void) {
    return inl(CVMIO_PORT + CVMIO_REG_ID) == CVMIO_ID && inl(CVMIO_PORT + CVMIO_REG_VERSION) == CVMIO_VERSION;
}

u32 cvmio_call(struct cvmio_desc *d) {
    d->status = CVMIO_ST_PENDING;
    d->flags = 0;
    barrier(); /* the device reads the descriptor from memory during the OUT */
    outl(CVMIO_PORT + CVMIO_REG_DOORBELL, (u32)d);
    barrier();
    return d->status;
}
