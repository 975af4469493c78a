"""Shipped, trained probdeblend priors (safetensors weights + JSON model cards).

Installed as ``probdeblend._shipped_priors``; see ``probdeblend.load_prior``.
"""
