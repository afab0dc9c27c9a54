"""Model families: one folder each, holding ``<family>_bridge.py``."""
