import sys

from jattr.cli import main

sys.exit(main())
