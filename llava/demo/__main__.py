"""`python -m llava.demo`: the embedded default, end to end (see `llava.demo.pipeline`)."""

import sys

from llava.demo.pipeline import main

sys.exit(main())
