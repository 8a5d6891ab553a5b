"""Runs a host-side C++ test of tests/cpp/ (plain C++ against csrc/'s headers, no GPU needed): builds it with
the C++ compiler the extension uses, warnings as errors, and asserts it ran every check (tests/cpp/check.h
prints "ok" last and exits 0)."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_and_run(name, tmp_path, extra=()):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler found (set CXX): the extension itself needs one"
    exe = tmp_path / name
    src = os.path.join(ROOT, "tests", "cpp", f"{name}.cpp")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", *extra, "-I",
                            os.path.join(ROOT, "csrc"), src, "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, f"compiling {name} failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
