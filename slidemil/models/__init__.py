"""Models: tile backbones by name with their preprocessing card, and attention-MIL heads."""
