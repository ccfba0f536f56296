"""Production monitoring: drift of the traffic Keel answers (lifecycle.monitor.drift)."""
