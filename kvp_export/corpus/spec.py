"""What the code corpus is made of: permissively licensed Python projects pinned by sdist hash.

A corpus spec is a list of pins, one per line, in the syntax of a requirements file:

    NAME==VERSION --hash=sha256:HEX [--split=heldout] [--license=TEXT]

Every project is pinned to one exact version and the SHA-256 of its sdist, so the corpus is
the same bytes on every machine (pip fetches it; kvp checks the hash). `--split=heldout`
puts the whole project in the held-out split: splits are by project, never by file, so
no held-out project's code calibrates or trains anything. `--license` states the license
when the sdist's metadata does not (the text after = up to the next space, `_` for spaces).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import KvpError, check_choice
from ..pins import Pin

SPLITS = ("calib", "heldout")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!-]*$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Project(Pin):
    """A project of the corpus: its pinned sdist, its split and (when the pin states it) its license."""

    split: str = "calib"
    license: str | None = None  # stated in the pin; else read from the sdist's PKG-INFO

    @property
    def filename_stem(self) -> str:
        return f"{re.sub(r'[-_.]+', '-', self.name).lower()}-{self.version}.sdist"


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    projects: tuple[Project, ...]
    find_links: str | None = None  # a local folder of sdists instead of the index (tests)

    def key(self) -> str:
        """Identity of the pinned content (not of where it is fetched from)."""
        blob = json.dumps([asdict(p) for p in self.projects], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def pins(self) -> list[dict]:
        return [asdict(p) for p in self.projects]


def parse_pins(text: str, where: str = "spec") -> tuple[Project, ...]:
    """Projects from pins text; an unpinned or malformed line is a one-line error naming it."""
    projects: list[Project] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req, *opts = line.split()
        name, eq, version = req.partition("==")
        if not eq or not _VERSION.match(version) or not _NAME.match(name):
            raise KvpError(f"{where}:{lineno}: '{req}' is not pinned to one version (expected NAME==VERSION "
                           "--hash=sha256:HEX)")
        fields: dict[str, str] = {}
        for opt in opts:
            key, _, value = opt.removeprefix("--").partition("=")
            if key not in ("hash", "split", "license") or not value or key in fields:
                raise KvpError(f"{where}:{lineno}: unknown or repeated option '{opt}' (expected --hash=sha256:HEX, "
                               "--split=heldout, --license=TEXT)")
            fields[key] = value
        digest = fields.get("hash", "").removeprefix("sha256:")
        if not _HEX.match(digest):
            raise KvpError(f"{where}:{lineno}: {req} has no --hash=sha256:HEX (64 lowercase hex digits): "
                           "every sdist is pinned by its hash")
        split = fields.get("split", "calib")
        if split not in SPLITS:
            raise KvpError(f"{where}:{lineno}: unknown split '{split}' (expected one of: {', '.join(SPLITS)})")
        projects.append(Project(name, version, digest, split, fields.get("license", "").replace("_", " ") or None))
    names = [p.name.lower() for p in projects]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise KvpError(f"{where}: project '{dup}' is pinned twice")
    if not projects:
        raise KvpError(f"{where}: no project pinned")
    return tuple(projects)


def load_pins(path: str | Path, name: str | None = None, find_links: str | None = None) -> CorpusSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise KvpError(f"cannot read corpus spec {path}: {e.strerror or e}") from None
    return CorpusSpec(name or path.stem, parse_pins(text, str(path)), find_links)


# The built-in corpus's pins, with why each project is there: pypi-code.txt beside this module.
PYPI_CODE_PINS = (Path(__file__).parent / "pypi-code.txt").read_text()

CORPORA: dict[str, CorpusSpec] = {}


def register(spec: CorpusSpec) -> CorpusSpec:
    """Make `spec` a named corpus that stages accept in place of paths (`--calib NAME`)."""
    CORPORA[spec.name] = spec
    return spec


PYPI_CODE = register(CorpusSpec("pypi-code", parse_pins(PYPI_CODE_PINS, "pypi-code")))


def corpus_spec(name: str) -> CorpusSpec:
    """The named corpus `name`; an unknown name is refused in one line."""
    check_choice("corpus", name, CORPORA)
    return CORPORA[name]
