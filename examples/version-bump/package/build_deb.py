"""Build the greeter package, version VERSION, into OUTDIR with dpkg-deb: what a maintainer's CI does on a bump.

    python3 build_deb.py VERSION OUTDIR

The same version builds byte for byte the same .deb (fixed file times), so the image cache finds it again; a new
version, or any change to the files, is a new .deb and so a new image.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOCH = 1700000000


def build(version: str, outdir: Path) -> Path:
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "greeter"
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: greeter\nVersion: {version}\nArchitecture: all\nDepends: python3\n"
            "Maintainer: pytest-systemd-harden <example@example.org>\n"
            "Description: the version-bump example's service\n")
        for source, dest in (("src/greeter.py", "usr/lib/greeter/greeter.py"),
                             ("debian/greeter.service", "usr/lib/systemd/system/greeter.service")):
            (root / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HERE / source, root / dest)
        (root / "usr/share/greeter").mkdir(parents=True)
        (root / "usr/share/greeter/VERSION").write_text(version + "\n")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
            os.utime(path, (EPOCH, EPOCH))
        outdir.mkdir(parents=True, exist_ok=True)
        deb = outdir / f"greeter_{version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                       capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)})
        return deb


if __name__ == "__main__":
    print(build(sys.argv[1], Path(sys.argv[2])))
