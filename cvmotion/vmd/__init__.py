"""vmd: the VM process (the emulated hardware of one CVM) and its typed protocol."""
