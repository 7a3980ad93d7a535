"""hatun: keep several WireGuard tunnels up and steer private prefixes over the healthy ones."""

__version__ = "0.1.0"
