"""`python -m llava.demo`: the embedded default, end to end (see `llava.demo.pipeline`)."""

import sys

from llava.demo.pipeline import main
from llava.runtime import configure_threads

configure_threads()  # every stage inherits the choice (OMP_NUM_THREADS); LLAVA_THREADS overrides it
sys.exit(main())
