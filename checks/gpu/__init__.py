"""GPU checks: thin NVML/driver probes and pure judges."""

from checks.gpu import driver  # noqa: F401  (registers the checks)
