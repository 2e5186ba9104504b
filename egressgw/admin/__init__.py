"""The admin HTTP server: health, readiness, metrics and the blocklists firewalls poll."""
