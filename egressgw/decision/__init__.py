"""Deciding a flow: canonical names, the destination guard, policy tiers and the path through them.

Pure apart from ``path``, which awaits the resolver: ``names`` -> ``guard`` -> feeds -> ``policy``.
"""
