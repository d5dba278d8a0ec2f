"""control layer: the knobs of host maintenance (limits and timeouts), with KubeVirt's defaults where it has one."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MaintenanceOptions"]


@dataclass(frozen=True, slots=True)
class MaintenanceOptions:
    cluster_limit: int = 5  # live moves in flight in the whole fleet (KubeVirt parallelMigrationsPerCluster)
    notice_s: float = 15.0  # a Scheduled Event's NotBefore, from when it is scheduled (a drain may say otherwise)
    freeze_live_s: int = 5  # DurationInSeconds of a live migration's Freeze (the blackout is far shorter)
    freeze_in_place_s: int = 1  # DurationInSeconds of an in-place update's Freeze (the pause stays under 1 s)
    completion_base_s: float = 120.0  # a live move is cancelled after base + per GiB of the VM's memory
    completion_per_gib_s: float = 15.0  # (KubeVirt completionTimeoutPerGiB, sized for this emulated fleet)
    in_place_timeout_s: float = 90.0  # the host's memory-preserving update, its daemon restart included
    attest_wait_s: float = 15.0  # how long a moved VM's fresh attestation is waited for before it is reported
    stop_timeout_s: float = 60.0  # a redeploy's stop on the source must be confirmed within this
    boot_timeout_s: float = 120.0  # a redeployed VM must run on its new host within this
    lease_s: float = 5.0
    poll_s: float = 0.2

    def completion_timeout(self, memory_gib: int) -> float:
        return self.completion_base_s + self.completion_per_gib_s * memory_gib
