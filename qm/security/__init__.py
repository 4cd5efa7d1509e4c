"""Transport security, tokens and roles, secrets: what keeps strangers out (docs/security.md)."""
