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

from ..errors import KvpError

SPLITS = ("calib", "heldout")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!-]*$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Project:
    name: str
    version: str
    sha256: str
    split: str = "calib"
    license: str | None = None  # stated in the pin; else read from the sdist's PKG-INFO

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

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


# The built-in corpus: large, permissively licensed, mostly pure-Python projects whose sdists
# pip can fetch without running project code (no in-tree build backend). Versions: the newest
# release for Python 3.11 on 2026-11-30. docutils stays pinned on purpose: its metadata names
# the GPL (for one Emacs file), so the license rule drops it, and the build shows the rule at
# work. Held out: twelve whole projects of several kinds (libraries, web, tooling, databases).
PYPI_CODE_PINS = """
aiohttp==3.14.5 --hash=sha256:5558a7f5a05af9ecf744af91e5baefc436f93c9333e656c27ec253f9a6bbe178
alembic==1.20.1 --hash=sha256:83490def1f723413db5096591f7609ac52544805be93849170088ed04f5a2e0b --split=heldout
astropy==8.0.2 --hash=sha256:e6af35823099ad6a40b57dbe5ff845f577374ea131925c9fa4b49eeab06c5310
biopython==1.88 --hash=sha256:9aaa31c0bda4d059f7b2ee00bfdb5cbb73ade3057aa4b737a7cc0187091d071a
black==26.10.1 --hash=sha256:5f9f83beae62437e060dafd53d7f1fc327e3d3494f74d72ee5c2b73eb90fc4e7 --split=heldout
bokeh==3.9.2 --hash=sha256:5be30d105b329d7d2ab1cb92f51e6bd44e23f0fe21ab8d49594b220b2ab11632
boto==2.49.0 --hash=sha256:ea0d3b40a2d852767be77ca343b58a9e3a4b00d9db440efb8da74b4e58025e5a
botocore==1.44.8 --hash=sha256:945b783c1a1259e2a8b078f3f3dd40fae32ea84ab01d3a9953af6b378da7108a
celery==5.7.0 --hash=sha256:6a5dfcf6662287204f009a02002b9e66c83d4105e47ebabdc7079108772fc6f0 --split=heldout
Cython==3.3.1 --hash=sha256:e0e45989e821bef6aa9ae15c7d583ab5e055f7406c4b3624e49e06d24e90375a
dagster==1.13.29 --hash=sha256:28db008ba360a785cd7f4677c1e0964577f14aa5762f117b978a8485cd11c9f4
dask==2026.8.0 --hash=sha256:8a94c37b5de6d869343340dc26c3c3acca7ec48a3abdabe00ea3abb1125884d5
Django==5.2.19 --hash=sha256:ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1
docutils==0.23 --hash=sha256:746f5060322511280a1e50eb76846ed6bf2342984b2ac04dc42caa1a8d78799e
great_expectations==1.24.1 --hash=sha256:d35f98a4a1ec27457b61a99ed194ad55eeabcd9c9677162dd2a5db853e9f2490
ibis-framework==12.0.0 --hash=sha256:238624f2c14fdab8382ca2f4f667c3cdb81e29844cd5f8db8a325d0743767c61
jedi==0.20.1 --hash=sha256:2f71208c3f9c1bca057c0e90d3f272aba44ace88fc4067d7587e9e069331b7e5
keras==3.15.1 --hash=sha256:92ae7c1dd7f61041953dc2d42253181ee099086f0b58ae36fcf98147a6f08a29
kubernetes==37.0.2 --hash=sha256:6967599ef976d0bb9c663c3621e690db0e26fbab7cf5c5e3ccf7e11b790d2de9
matplotlib==3.11.2 --hash=sha256:cec596316640f2b394b8f0daa0ea61a8eae82d017b620b9f202befb972a59ea4
mlflow==3.18.0 --hash=sha256:04e912d5b154b417c5930ba47ef3dc2f74738fb3ba93e3d70499955ec8884540
mne==1.13.2 --hash=sha256:729829e35010a7273cce8608d61d930c973fbead6edc1a70316c01e3a5551521
moto==5.2.5 --hash=sha256:391857257d5dac144334013c2c10e599def5f0562f553e979160140bd7bd9cf6
mypy==2.4.1 --hash=sha256:63b590965691e540a335fa74dadf31a7069142f6b72e234689bbd244edf55623 --split=heldout
networkx==3.6.1 --hash=sha256:26b7c357accc0c8cde558ad486283728b65b6a95d85ee1cd66bafab4c8168509 --split=heldout
nibabel==5.4.2 --hash=sha256:d5f4b9076a13178ae7f7acf18c8dbd503ee1c4d5c0c23b85df7be87efcbb49da --split=heldout
nltk==3.10.4 --hash=sha256:44679f4e9220abfd496d2c8cdb22f8425ccbe557604f9aa5cacb1c44003dabc1
numba==0.68.1 --hash=sha256:9de461812470173a14eeb7e0bbd27c897dffe835402a33861166842fc5f6ea57
numpy==2.4.6 --hash=sha256:f3a3570c4a2a16746ac2c31a7c7c7b0c186b95ce902e33db6f28094ed7387dda
optuna==5.0.0 --hash=sha256:358bb878b7b1e20e90dc944ac4261796dd3d5c2b7860aa960a08fc10e0b5beff
pandas==3.1.1 --hash=sha256:05fed3e3b7c99b226f160e29d7d6cb7ef39638c758cbfe42b3f24ba34f04b859
pip==26.3 --hash=sha256:6c36ae7da8695be67e3cd9f7d87919667ced53f57ce2ede75d89b5912ed2bc4c
plotly==7.1.0 --hash=sha256:f860166a4a3d78c69cb1f4a15f28a5c8283eade98a282a698f3bb853a449ace5
prefect==3.9.1 --hash=sha256:56f091cd49a06e6c3f98eea93648208f6750361d1dd0aeb60b5faa0e9cb5c458
pydantic==2.14.4 --hash=sha256:7c19f1d46f8accf55a4617a6116e1ade64840870f397b846a2c53fb9019414ba
Pygments==2.21.0 --hash=sha256:610ca751c9bc2492b38eb9a38a7fbc93edbbb2d7182edaf34e66ae493dee5c8c
pymongo==4.20.1 --hash=sha256:1ac112b3ffa3d010cfc2fc54e3ae677a12c63d18c6115db4451df64f1a1175eb --split=heldout
pyomo==6.10.1 --hash=sha256:74a9109c3b4ab97e69d6b1a1ca4e96a54442a177d8b1a19393e417e6ba008ba3
pytensor==3.0.7 --hash=sha256:858df82fa44e5401c9e913e5acaa5e0044f1515db0290755a139e58e28f22b9e
pytest==9.2.0 --hash=sha256:97c4f3b1f3c7414aa36465e09b8220f1d03627993bd51b1282e193753c80557b --split=heldout
scikit-learn==1.9.1 --hash=sha256:629cada3e33e2b9bf376cdc7614a47a4140b8aedc1d836579e359736fbd82977
scipy==1.17.1 --hash=sha256:95d8e012d8cb8816c226aef832200b1d45109ed4464303e997c5b13122b297c0
Scrapy==2.19.0 --hash=sha256:34130726582b64c91531162ab277c4053e558876d49ba219cb43679e71d80a87 --split=heldout
Sphinx==9.0.4 --hash=sha256:594ef59d042972abbc581d8baa577404abe4e6c3b04ef61bd7fc2acbd51f3fa3
SQLAlchemy==2.1.9 --hash=sha256:d700a8b2edfb26282a470333d6bc4a454c4acda4d201a3bea7b72fa76c217d28
sqlglot==30.30.0 --hash=sha256:b8e344042c85d7baa1d0d827127dfe1611ce9ac59bceab6fe370665baeb14ce7 --split=heldout
statsmodels==0.15.0 --hash=sha256:5d257fe58d0772bc46a557880ca78e2a8e07fec7bfd9d11074aef8e33e1aecbc
sunpy==7.0.5 --hash=sha256:164074dacfdf72db2de6db80cea6897b5e9285db38c50a0e841c6b0548ec4020
sympy==1.14.0 --hash=sha256:d3d3fe8df1e5a0b42f0e7bdf50541697dbe7d23746e894990c030e2b05e72517
tornado==6.6.1 --hash=sha256:28e6311402af59c8b02e3fa0f5e7d8eb465b25081381803b127d97e6a4395d5a --split=heldout
transformers==5.24.0 --hash=sha256:906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3
Twisted==26.10.0 --hash=sha256:5f0355403e507fc23ceea85e9dbb4bc59335aabde41dd324e8b8cea180dd38de
wagtail==8.0.1 --hash=sha256:819865a10bce86b16288cfaefa4195b90ffb5e7ac494fb18659e7be099ef386f
xarray==2026.9.0 --hash=sha256:6abc69694c22fa1f0fb2f357ff4e41d88beb4477ed71091f944b7dbf67ed54fe --split=heldout
"""

SOURCES: dict[str, CorpusSpec] = {}


def register(spec: CorpusSpec) -> CorpusSpec:
    """Make `spec` a named corpus that stages accept in place of paths (`--calib NAME`)."""
    SOURCES[spec.name] = spec
    return spec


PYPI_CODE = register(CorpusSpec("pypi-code", parse_pins(PYPI_CODE_PINS, "pypi-code")))


def source(name: str) -> CorpusSpec:
    try:
        return SOURCES[name]
    except KeyError:
        raise KvpError(f"unknown corpus '{name}' (known: {', '.join(SOURCES)})") from None
