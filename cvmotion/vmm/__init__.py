"""vmm layer: the VM runtime (KVM and emulated backends, guest memory, dirty tracking, vCPUs, devices).

Entry points (imported from their modules, so importing one does not load unicorn or numpy needlessly):
``vm.Vm`` / ``vm.MachineConfig`` (run, pause, dirty pages, state), ``snapshot.VmState`` /
``save_snapshot`` / ``load_snapshot``, ``memory.GuestMemory`` (the memfd), ``images.load_image``,
``sku.find_sku`` / ``parse_memory``, ``workloads.KvClient`` / ``MemdirtyModel``.
"""
