"""Wire formats, sans-IO: HTTP/1.1 framing rules, the TLS ClientHello reader, our HTTP answers."""
