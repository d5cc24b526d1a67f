"""`python -m utils.convert_ldm`: the entry point kept where users and doc/CONVERSION.md know it; the code is
utils/sd/convert_ldm.py."""
import sys

from utils.sd.convert_ldm import main

if __name__ == "__main__":
    sys.exit(main())
