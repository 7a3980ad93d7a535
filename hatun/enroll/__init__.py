"""Keyless CI runners: WireGuard peers enrolled with an OIDC token (issue 16)."""
