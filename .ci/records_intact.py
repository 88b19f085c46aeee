"""Fail unless every file each named distribution installed is still there with the hash pip recorded.

Usage: python records_intact.py DIST [DIST ...]  (run with the venv's python)
"""

import base64
import hashlib
import sys
from importlib import metadata

bad = []
for name in sys.argv[1:]:
    dist = metadata.distribution(name)
    checked = 0
    for f in dist.files or []:
        if f.hash is None:  # RECORD itself, and .pyc files pip compiled
            continue
        path = f.locate()
        try:
            digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, path.read_bytes()).digest()).rstrip(b"=").decode()
        except FileNotFoundError:
            bad.append(f"{name}: {f} is missing")
            continue
        if digest != f.hash.value:
            bad.append(f"{name}: {f} was overwritten")
        checked += 1
    print(f"{name} {dist.version}: {checked} files intact" if not bad else f"{name}: checked {checked}")
if bad:
    sys.exit("\n".join(bad))
