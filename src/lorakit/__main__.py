"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`)."""
import sys

from lorakit.cli.main import main

sys.exit(main())
