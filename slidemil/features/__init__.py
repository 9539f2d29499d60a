"""`slidemil extract`: the engine's tile pipeline with a backbone runner and a features writer."""
