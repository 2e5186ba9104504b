"""Where connections come in: the explicit proxy (CONNECT and absolute-form HTTP)."""
