"""Adapters: models from other libraries as ``edmrt.Model`` (``edmrt.adapters.diffusers``).

Each adapter imports its library inside its functions, never at ``import edmrt`` time.
"""
