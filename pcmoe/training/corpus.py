"""Build the offline English technical-text corpus the default LM is trained on.

Three domains, all from files that Debian or the Python install put on the machine:
  pydoc     python3.11-doc reST sources            (PSF licence)
  linuxdoc  linux-doc-6.1 Documentation .rst/.txt  (GPL-2)
  stdlib    the Python standard library source    (PSF licence)

Documents are de-duplicated by content hash (each file is listed once even when globs overlap),
and 2 % of the *documents* of each domain are held out for validation, chosen by a hash of the
document so the split never changes when the file list is re-read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOC_SEPARATOR = "\n\n=====\n\n"  # the document separator `pcmoe eval --data` understands
VAL_FRACTION = 0.02

_PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
_LINUXDOC_ROOT = Path("/usr/share/doc/linux-doc-6.1/Documentation")


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Document:
    domain: str
    path: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8", "replace")).hexdigest()


def _read_text(path: Path) -> str | None:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\f", "\n")  # form feeds are our separator
    return text if text.strip() else None


def _domain_files(domain: str) -> list[Path]:
    if domain == "pydoc":
        return sorted(_PYDOC_ROOT.rglob("*.rst.txt"))
    if domain == "linuxdoc":
        files = []
        for p in _LINUXDOC_ROOT.rglob("*"):
            name = p.name[:-3] if p.name.endswith(".gz") else p.name
            if p.is_file() and name.endswith((".rst", ".txt")):
                files.append(p)
        return sorted(files)
    if domain == "stdlib":
        root = _stdlib_root()
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    raise ValueError(f"unknown domain {domain!r}")


DOMAINS = ("pydoc", "linuxdoc", "stdlib")

_PACKAGE_HINT = {
    "pydoc": "apt-get install python3.11-doc",
    "linuxdoc": "apt-get install linux-doc-6.1",
    "stdlib": "a CPython install with its standard library",
}


def load_documents(domains=DOMAINS) -> list[Document]:
    """All unique documents of the domains, in a stable order."""
    seen: set[str] = set()
    docs: list[Document] = []
    for domain in domains:
        files = _domain_files(domain)
        if not files:
            sys.exit(f"error: no {domain} documents found; install them with: {_PACKAGE_HINT[domain]}")
        for path in files:
            text = _read_text(path)
            if text is None:
                continue
            doc = Document(domain, str(path), text)
            if doc.digest in seen:
                continue
            seen.add(doc.digest)
            docs.append(doc)
    return docs


def is_validation(doc: Document) -> bool:
    # A stable per-document coin: the hash of the content, not the position in a list.
    return int(doc.digest[:8], 16) / 0xFFFFFFFF < VAL_FRACTION


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_validation(d)]
    val = [d for d in docs if is_validation(d)]
    return train, val


def write_corpus(out_dir: Path) -> dict:
    """Write train/val text files per domain (documents joined by DOC_SEPARATOR) and a manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = load_documents()
    train, val = split(docs)
    manifest = {"domains": {}}
    for domain in DOMAINS:
        for name, part in (("train", train), ("val", val)):
            texts = [d.text for d in part if d.domain == domain]
            path = out_dir / f"{name}_{domain}.txt"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(DOC_SEPARATOR.join(texts), encoding="utf-8")
            os.replace(tmp, path)
            manifest["domains"].setdefault(domain, {})[name] = {
                "documents": len(texts),
                "bytes": sum(len(t.encode()) for t in texts),
                "file": path.name,
            }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
