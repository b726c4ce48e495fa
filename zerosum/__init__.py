"""zerosum's public client package (the client itself follows)."""
