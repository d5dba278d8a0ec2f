"""abi layer: byte-exact formats (SNP report, TCB, policy, guest messages, KVM structs, wire records). No I/O."""
