"""Configuration: YAML with line numbers in (``source``), a validated frozen model (``model``)."""
