"""``python -m training simulate|train|evaluate|export|all``."""

from training.cli import main

raise SystemExit(main())
