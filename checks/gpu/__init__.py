"""GPU checks: thin NVML/driver/kernel-log probes and pure judges."""

from checks.gpu import driver, health  # noqa: F401  (registers the checks)
