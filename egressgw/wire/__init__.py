"""Wire formats, sans-IO: the TLS ClientHello reader and the gateway's own HTTP answers."""
