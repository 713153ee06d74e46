"""How a model file with one entry the format does not expect is read: a valid `notebook` model
file plus 800 MB of zeros, deflated to under 1 MB, appended as an extra entry.

    python scripts/oversized_entry.py            # this checkout's xpcnn
    PYTHONPATH=OLD_CHECKOUT python scripts/oversized_entry.py

prints what loading it did (the error, or "loaded"), the seconds it took and the loading
process's peak resident memory. xpcnn refuses such an entry before inflating it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LOAD = """
import resource, sys, time
import xpcnn
t = time.perf_counter()
try:
    xpcnn.load_model(sys.argv[1])
    outcome = "loaded"
except Exception as e:
    outcome = f"{type(e).__name__}: {str(e)[:100]}"
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{outcome}\\n{seconds:.2f} s, peak resident memory {peak:,.0f} MB")
"""


def main() -> None:
    import xpcnn
    from xpcnn.models import build_layers

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        xpcnn.Sequential(build_layers("notebook"), input_shape=(32, 32, 3)).save(str(path))
        size = path.stat().st_size
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z, \
                z.open("extra.npy", "w", force_zip64=True) as f:
            for _ in range(50):
                f.write(bytes(16 << 20))
        grown = path.stat().st_size
        print(f"model file {size / 1e6:.1f} MB, with the extra entry {grown / 1e6:.1f} MB "
              "(800 MB inflated)")
        # (from the temporary folder: "-c" puts the current folder first on the import path)
        subprocess.run([sys.executable, "-c", LOAD, str(path)], check=True, cwd=tmp)


if __name__ == "__main__":
    main()
