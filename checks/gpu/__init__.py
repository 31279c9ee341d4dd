"""GPU checks: thin NVML/driver/kernel-log probes and pure judges."""

from checks.gpu import driver, fabricmanager, health  # noqa: F401  (registers the checks)
