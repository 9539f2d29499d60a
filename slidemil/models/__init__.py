"""Models: tile backbones by name with their preprocessing card, and MIL heads (ABMIL, CLAM, DSMIL, TransMIL)."""
