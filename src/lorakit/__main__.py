"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`)."""
import sys

from .cli import main

sys.exit(main())
