"""`python -m ufo_trio` = `python -m ufo_trio serve` (EP-2)."""

from ._cli import main

raise SystemExit(main())
