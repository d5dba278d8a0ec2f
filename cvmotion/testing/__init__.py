"""Shipped fakes and adversaries for tests (FakeClock, adversarial hypervisor, conformance checks)."""
