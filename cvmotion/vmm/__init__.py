"""vmm layer: the VM runtime (KVM and emulated backends, guest memory, dirty tracking, vCPUs, devices)."""
