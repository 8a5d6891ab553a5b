"""Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, for gpu_check.sh to install there.

    make gpu-wheels                                   # the pinned set below
    python benchmarks/gpu_wheels.py [NAME==VERSION ...] [--dest .whl] [--kinds PATH] [--check-only]

The device has no package index and no kornia (the GPU augmentation baseline), so kornia and its compiled
dependency kornia_rs travel as CPython 3.12 manylinux x86_64 wheels (the device tool's README: `pip
download --no-deps --only-binary=:all: --python-version 3.12 ...`). Then every wheel's Requires-Dist
(extras left out, markers evaluated for Linux x86_64 CPython 3.12) must be met by another wheel here or
by a package the device already has: its list is read from the device tool's KINDS.md, with versions where
KINDS.md gives them. One version per project, or pip there refuses the whole install.
The pins are the versions the CPU benchmarks here run (requirements-dev.txt's kornia), so a GPU kornia
column compares against the same kornia.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = ["kornia==0.9.0", "kornia_rs==0.2.0"]
KINDS = "/work/.library/device/KINDS.md"
# the device's Python and platform (KINDS.md: Python 3.12.3, x86-64)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def download(specs, dest):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", dest]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(specs), check=True)


def device_packages(path):
    """({canonical name}, {canonical name: version}) of what KINDS.md says the GPU machine holds."""
    text = open(path).read()
    names, versions = set(), {}
    m = re.search(r"Packages: ([^\n]+)", text)
    if m:
        names = {canonicalize_name(n.strip().rstrip(".")) for n in m.group(1).split(",") if n.strip()}
    row = re.search(r"\| pip list[^|]*\|([^|\n]+)\|", text)
    if row:
        for name, ver in re.findall(r"([A-Za-z0-9_.-]+) (\d[\w.+]*)", row.group(1)):
            versions[canonicalize_name(name)] = ver.rstrip(".")
    return names | set(versions), versions


def wheel_requirements(path):
    """Requires-Dist of a wheel that apply on the device (no extras)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(ENV):
            out.append(req)
    return out


def _fits_device(tags):
    for t in tags:
        plat_ok = t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64"))
        py_ok = t.interpreter in ("py3", "cp312") and t.abi in ("none", "abi3", "cp312")
        if plat_ok and py_ok:
            return True
    return False


def check(folder, kinds_path):
    """Problems that would stop the install or the import on the device; [] when there are none."""
    problems, have = [], {}
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    if not wheels:
        return [f"no wheels in {folder}"]
    for f in wheels:
        name, version, _, tags = parse_wheel_filename(f)
        if name in have:
            problems.append(f"two versions of {name}: {have[name]} and {version} (pip refuses both)")
        have[name] = version
        if not _fits_device(tags):
            problems.append(f"{f} is not a CPython 3.12 Linux x86_64 wheel")
    if kinds_path and os.path.exists(kinds_path):
        on_device, versions = device_packages(kinds_path)
    else:
        on_device, versions = None, {}
        print(f"note: {kinds_path} not found: requirements checked against these wheels only")
    for f in wheels:
        for req in wheel_requirements(os.path.join(folder, f)):
            name = canonicalize_name(req.name)
            if name in have:
                if not req.specifier.contains(have[name], prereleases=True):
                    problems.append(f"{f} needs {req}, the wheel here is {have[name]}")
                status = f"wheel {have[name]}"
            elif on_device is not None and name in on_device:
                ver = versions.get(name)
                if ver and not SpecifierSet(str(req.specifier)).contains(Version(ver), prereleases=True):
                    problems.append(f"{f} needs {req}, the device has {ver}")
                status = f"on the device{f' ({ver})' if ver else ''}"
            else:
                problems.append(f"{f} needs {req}: neither a wheel here nor on the device's list")
                status = "MISSING"
            print(f"{f.split('-')[0]}: requires {req} -> {status}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", default=PINS, help=f"NAME==VERSION (default: {' '.join(PINS)})")
    p.add_argument("--dest", default=os.path.join(ROOT, ".whl"))
    p.add_argument("--kinds", default=KINDS, help="the device tool's KINDS.md (its package list)")
    p.add_argument("--check-only", action="store_true", help="check the wheels in --dest, download nothing")
    a = p.parse_args(argv)
    for spec in a.specs:
        if "==" not in spec:
            p.error(f"pin each wheel to one version (NAME==VERSION), got {spec!r}")
    if not a.check_only:
        with tempfile.TemporaryDirectory() as tmp:  # the old set is replaced only by a complete new one
            download(a.specs, tmp)
            os.makedirs(a.dest, exist_ok=True)
            for f in os.listdir(a.dest):
                if f.endswith(".whl"):
                    os.remove(os.path.join(a.dest, f))
            for f in os.listdir(tmp):
                shutil.move(os.path.join(tmp, f), os.path.join(a.dest, f))
    problems = check(a.dest, a.kinds)
    size = sum(os.path.getsize(os.path.join(a.dest, f)) for f in os.listdir(a.dest) if f.endswith(".whl"))
    for msg in problems:
        print("PROBLEM:", msg, file=sys.stderr)
    print(f"{a.dest}: {size / 2**20:.1f} MiB of wheels (the device carries at most 64 MiB with the tree); "
          + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
