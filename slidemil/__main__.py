"""``python -m slidemil`` (used by torchrun: ``torchrun ... -m slidemil train ...``)."""

from slidemil.cli import main

raise SystemExit(main())
