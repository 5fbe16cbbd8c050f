#!/usr/bin/env python
"""Install Detectron2 into the current Python environment, the way cmrcnn_ext needs it.

Run with the Python of the environment to install into (``scripts/env.sh`` does this)::

    python tools/install_detectron2.py            # v0.6 (patched), unless one is installed
    python tools/install_detectron2.py --official # official Detectron2 main with compiled _C
    python tools/install_detectron2.py --check    # only report, exit 1 if not usable

``--official`` installs official Detectron2 built from its main branch: from a wheel
(``--wheel FILE``, ``$CMRCNN_D2_WHEEL``, or one found in ``../shared/detectron2/main-*/`` beside
the repository, built for this Python and torch), else from GitHub
(``pip install --no-build-isolation git+https://github.com/facebookresearch/detectron2.git``,
minutes of compiling) when github.com is reachable; otherwise it exits with code 3 and says why.

Without ``--official``, in order:

1. If an **official detectron2** (one with its compiled ``detectron2._C`` extension, e.g. built
   from the git repository) is importable, it is used as is: nothing is installed.
2. If a detectron2 installed by this script at the current patch level is importable, nothing
   is done (a second run is a no-op).
3. Otherwise the ``pb1-detectron2==0.6`` source distribution is downloaded from PyPI with pip.
   That sdist is the official detectron2 v0.6 Python code, but it lacks the C++ sources and
   does not install the model-zoo YAML configs, and v0.6 predates Pillow 10, numpy 2 and
   Python 3.11. The source patches in :data:`PATCHES` are applied, a pure-Python placeholder
   for ``detectron2._C`` is written (see :data:`C_PLACEHOLDER`), and the result is installed
   with pip (no build isolation, so it sees the installed torch).

Every source patch replaces one exact piece of v0.6 text; a patch whose text is absent is
skipped, so already-fixed code is left alone. None of them changes a numerical result. Fixes
that can be applied at run time instead live in ``cmrcnn_ext/compat.py``.

These fixes are here, at install time, because they must hold when ``detectron2`` is imported
on its own (a user's script that never imports cmrcnn_ext).
"""

import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile

SDIST_REQUIREMENT = "pb1-detectron2==0.6"

#: Bumped whenever :data:`PATCHES` or :data:`C_PLACEHOLDER` change, so that an older patched
#: install is replaced on the next run.
PATCH_LEVEL = 1

#: (file relative to the sdist root, exact v0.6 text, replacement, why).
PATCHES = [
    (
        "setup.py",
        "ext_modules=get_extensions(),",
        "ext_modules=[],",
        "The sdist has no detectron2/layers/csrc: build no C++ extension.",
    ),
    (
        "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
        "Install the model-zoo configs that the sdist ships under detectron2/model_zoo/configs "
        "(v0.6's glob looks for a top-level configs/ folder the sdist does not have).",
    ),
    (
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
        "Pillow >= 10 removed the alias Image.LINEAR (== BILINEAR); import failed.",
    ),
    (
        "detectron2/structures/masks.py",
        "np.bool)",
        "bool)",
        "numpy >= 1.24 removed the alias np.bool (== bool); empty polygons crashed.",
    ),
    (
        "detectron2/evaluation/pascal_voc_evaluation.py",
        "astype(np.bool)",
        "astype(bool)",
        "numpy >= 1.24 removed the alias np.bool (== bool).",
    ),
    (
        "detectron2/data/common.py",
        "self._rng.sample(self._fallback_candidates, k=1)",
        "self._rng.sample(sorted(self._fallback_candidates), k=1)",
        "Python 3.11 random.sample() rejects sets: a mapper returning None (a skipped bad "
        "sample) crashed training with a TypeError instead of retrying another sample.",
    ),
]

#: Written to detectron2/_C.py. v0.6 imports ``detectron2._C`` at module level in layers and
#: evaluation modules (rotated boxes, deformable conv, fast COCO eval) and ``collect_env``
#: asks it for compiler versions. Axis-aligned Cascade Mask R-CNN needs none of these ops
#: (ROIAlign and NMS come from torchvision); using one raises a clear error.
C_PLACEHOLDER = '''"""Placeholder for detectron2's compiled extension.

Written by cmrcnn_ext's tools/install_detectron2.py (CMRCNN_PATCH_LEVEL = {level}): this
detectron2 was installed from the pb1-detectron2 v0.6 sdist, which has no C++ sources. The
compiled operators (rotated boxes, deformable convolution, the C++ COCO evaluator) are not
available; everything cmrcnn_ext uses is pure Python or comes from torchvision.
"""

CMRCNN_PLACEHOLDER = True
CMRCNN_PATCH_LEVEL = {level}


def get_compiler_version():
    return "none (detectron2 installed without its C++ extension)"


def get_cuda_version():
    return "none (detectron2 installed without its C++ extension)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"detectron2._C.{{name}} is a compiled operator, and this detectron2 was installed "
        "without its C++ extension (pb1-detectron2 v0.6 sdist, via cmrcnn_ext). Axis-aligned "
        "Cascade Mask R-CNN does not need it. For rotated boxes, deformable convolution or the "
        "C++ COCO evaluator, install official detectron2 from its git repository."
    )
'''.format(level=PATCH_LEVEL)


def apply_patches(root, patches=PATCHES, log=print):
    """Apply ``patches`` to the source tree at ``root``.

    Returns:
        list[str]: one line per patch saying whether it was applied or already right.
    """
    report = []
    for rel, old, new, why in patches:
        path = os.path.join(root, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if old in text:
            text = text.replace(old, new)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            report.append(f"patched   {rel}: {why}")
        else:
            report.append(f"unchanged {rel}: '{old}' not present")
    for line in report:
        log("  " + line)
    return report


def installed_state():
    """Return ("official" | "patched" | "stale" | "missing", detail)."""
    if importlib.util.find_spec("detectron2") is None:
        return "missing", "detectron2 is not importable"
    try:
        import detectron2
        from detectron2 import _C
    except ImportError as e:
        return "stale", f"detectron2 imports but its _C does not ({e})"
    where = os.path.dirname(detectron2.__file__)
    if not getattr(_C, "CMRCNN_PLACEHOLDER", False):
        return "official", f"detectron2 {detectron2.__version__} with compiled _C at {where}"
    if getattr(_C, "CMRCNN_PATCH_LEVEL", 0) != PATCH_LEVEL:
        return "stale", f"patch level {_C.CMRCNN_PATCH_LEVEL} != {PATCH_LEVEL} at {where}"
    return "patched", f"detectron2 {detectron2.__version__} (v0.6 sdist, patched) at {where}"


def _pip(*args):
    """``pip ARGS`` in this Python. Where scripts/env.sh names a uv executable (``CMRCNN_UV``),
    ``install`` goes through uv first (parallel downloads and unpacking); pip, which reads the
    machine's pip configuration, takes over wherever uv fails. uv compiles the bytecode at
    install, as pip does: under ``PYTHONDONTWRITEBYTECODE=1`` nothing else would, and every
    process would compile the packages it imports again."""
    uv = os.environ.get("CMRCNN_UV")
    if uv and args[0] == "install" and "--upgrade" not in args:
        cmd = [uv, "pip", "install", "--compile-bytecode", "--python", sys.executable, *args[1:]]
        print("+", " ".join(cmd), flush=True)
        if subprocess.call(cmd) == 0:
            return
        print("uv could not install it; trying pip", flush=True)
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def install(workdir):
    _pip(
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "-d",
        workdir,
        SDIST_REQUIREMENT,
    )
    (sdist,) = glob.glob(os.path.join(workdir, "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    (root,) = [
        d for d in glob.glob(os.path.join(workdir, "*")) if os.path.isdir(d) and "detectron2" in d
    ]
    print(f"Patching {os.path.basename(root)} for Python {sys.version.split()[0]}:")
    apply_patches(root)
    with open(os.path.join(root, "detectron2", "_C.py"), "w", encoding="utf-8") as f:
        f.write(C_PLACEHOLDER)
    # A stale egg-info lists the sources of the unpatched package; let setuptools rebuild it.
    for egg in glob.glob(os.path.join(root, "*.egg-info")):
        for name in os.listdir(egg):
            os.remove(os.path.join(egg, name))
        os.rmdir(egg)
    _pip("install", "--no-build-isolation", root)


#: Exit code of ``--official`` when neither a wheel nor GitHub is available.
UNAVAILABLE = 3
GITHUB_REQUIREMENT = "git+https://github.com/facebookresearch/detectron2.git"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_official_wheel(explicit=None):
    """``(path or None, places searched)``: a wheel of official Detectron2 for this Python."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    explicit = explicit or os.environ.get("CMRCNN_D2_WHEEL")
    if explicit:
        return (explicit if os.path.isfile(explicit) else None), [explicit]
    patterns = [
        os.path.join(
            _REPO, os.pardir, "shared", "detectron2", "main-*", f"detectron2-*-{tag}-*.whl"
        ),
        os.path.join("/work", "shared", "detectron2", "main-*", f"detectron2-*-{tag}-*.whl"),
    ]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return os.path.normpath(found[-1]), patterns
    return None, patterns


def github_reachable(timeout=5.0):
    import socket

    try:
        socket.create_connection(("github.com", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def install_official(wheel=None):
    """Install official Detectron2 main (see the module docstring); returns an exit code."""
    state, detail = installed_state()
    if state == "official":
        print(f"detectron2: official: {detail}")
        return 0
    if state == "patched":
        print(f"detectron2: {detail}: replacing it with official Detectron2 main")
        _pip("uninstall", "-y", "pb1-detectron2")
    path, searched = find_official_wheel(wheel)
    if path:
        _pip("install", path)
    elif github_reachable():
        _pip("install", "--upgrade", "pip", "setuptools>=77,<81")  # pip 23 fails this build
        _pip("install", "--no-build-isolation", GITHUB_REQUIREMENT)
    else:
        print(
            "official Detectron2 main is not available here: no wheel found (searched "
            + ", ".join(searched)
            + ") and github.com is not reachable. Give a wheel with --wheel FILE or "
            "CMRCNN_D2_WHEEL (../shared/detectron2/README.md says how to build one).",
            file=sys.stderr,
        )
        return UNAVAILABLE
    return subprocess.call([sys.executable, __file__, "--check", "--official"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the state")
    parser.add_argument("--force", action="store_true", help="reinstall the patched v0.6")
    parser.add_argument(
        "--official", action="store_true", help="official Detectron2 main with compiled _C"
    )
    parser.add_argument("--wheel", help="wheel of official Detectron2 to install (--official)")
    args = parser.parse_args(argv)

    if args.official and not args.check:
        return install_official(args.wheel)
    state, detail = installed_state()
    print(f"detectron2: {state}: {detail}")
    if args.check:
        wanted = ("official",) if args.official else ("official", "patched")
        return 0 if state in wanted else 1
    if state in ("official", "patched") and not args.force:
        return 0
    if not re.match(r"^(2\.|[3-9])", __import__("torch").__version__):
        print("torch 2.x must be installed first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="cmrcnn-d2-") as workdir:
        install(workdir)
    # Re-check in a fresh interpreter: this one has the old modules cached.
    return subprocess.call([sys.executable, __file__, "--check"])


if __name__ == "__main__":
    sys.exit(main())
