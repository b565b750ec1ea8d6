"""ml_collections experiment configs (one file per experiment)."""
