import sys

from gemma_qlora.cli import main

sys.exit(main())
