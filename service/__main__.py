"""``python -m service``: the ``lensserve`` command line."""

from service.cli import main

raise SystemExit(main())
