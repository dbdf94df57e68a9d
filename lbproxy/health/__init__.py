"""Active health probes: what one probe does (checks) and when probes run (prober)."""
