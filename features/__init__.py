"""Level-2 study-aware features: ``build`` (pure, arrays in and out) and ``api`` (work directory)."""
