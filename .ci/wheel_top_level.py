"""Fail unless a wheel installs one import package, deepcore_auditor, and its dist-info."""

import sys
import zipfile

wheel = sys.argv[1]
tops = sorted({name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()})
extra = [t for t in tops if t != "deepcore_auditor" and not t.endswith(".dist-info")]
if extra:
    sys.exit(f"{wheel}: installs generic top-level names {extra}")
print(f"{wheel}: top level {tops}")
