"""Integration tests: the real gateway, curl, dnsmasq and echo upstreams on loopback."""
