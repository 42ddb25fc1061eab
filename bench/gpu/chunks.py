"""Cut files into numbered chunks grouped in carry sets, and put them back together (stdlib only)."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"
MIB = 1 << 20


def sha256(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def split(src: Path, payload: Path, chunk_bytes: int) -> dict:
    """Cut every file of `src` into chunks of `chunk_bytes`; chunks go into set folders of at most that size."""
    files, parts = [], []
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        chunks = []
        with open(path, "rb") as f:
            for i, block in enumerate(iter(lambda: f.read(chunk_bytes), b"")):
                name = f"{path.name}.part{i:03d}"
                chunks.append({"name": name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
                parts.append((name, block))
        files.append({"name": path.name, "size": path.stat().st_size, "sha256": sha256(path), "chunks": chunks})
    sets, size = [[]], 0
    for name, block in parts:                      # greedy, in order: set k holds what fits after set k-1
        if sets[-1] and size + len(block) > chunk_bytes:
            sets.append([])
            size = 0
        sets[-1].append(name)
        size += len(block)
    manifest = {"chunk_bytes": chunk_bytes, "files": files,
                "sets": {f"set{k:02d}": names for k, names in enumerate(sets, 1)}}
    data = dict(parts)
    lines = []
    for set_name, names in manifest["sets"].items():
        folder = payload / set_name
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).write_bytes(data[name])
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))     # every set is self-describing
        mib = sum(len(data[n]) for n in names) / MIB
        lines.append(f"{set_name}\t{(payload / set_name).as_posix()}\t{mib:.1f} MiB\t{' '.join(names)}")
    (payload / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (payload / "sets.txt").write_text("\n".join(lines) + "\n")
    return manifest


class ChunkError(RuntimeError):
    """A chunk or a reassembled file does not match its SHA-256."""


def assemble(payload: Path, store: Path) -> dict:
    """Move the chunks found under `payload` into `store`; rebuild and verify every file whose chunks are all there."""
    parts, done = store / "parts", store / "files"
    parts.mkdir(parents=True, exist_ok=True)
    done.mkdir(parents=True, exist_ok=True)
    manifests = sorted(payload.glob(f"*/{MANIFEST}")) + sorted(store.glob(MANIFEST))
    if not manifests:
        raise ChunkError(f"no {MANIFEST} under {payload} or {store}")
    manifest = json.loads(manifests[0].read_text())
    shutil.copyfile(manifests[0], store / MANIFEST) if manifests[0] != store / MANIFEST else None
    for chunk in payload.glob("*/*.part[0-9][0-9][0-9]"):
        shutil.copyfile(chunk, parts / chunk.name)
    status = {"complete": [], "missing": {}}
    for f in manifest["files"]:
        target = done / f["name"]
        if target.is_file() and target.stat().st_size == f["size"] and sha256(target) == f["sha256"]:
            status["complete"].append(f["name"])
            continue
        missing = [c["name"] for c in f["chunks"] if not (parts / c["name"]).is_file()]
        if missing:
            status["missing"][f["name"]] = missing
            continue
        for c in f["chunks"]:
            got = sha256(parts / c["name"])
            if got != c["sha256"]:
                (parts / c["name"]).unlink()       # carry that set again
                raise ChunkError(f"{c['name']}: sha256 {got} != {c['sha256']} (removed; carry its set again)")
        tmp = target.with_suffix(target.suffix + ".tmp")
        with open(tmp, "wb") as out:
            for c in f["chunks"]:
                with open(parts / c["name"], "rb") as src:
                    shutil.copyfileobj(src, out, 8 * MIB)
        if sha256(tmp) != f["sha256"]:
            tmp.unlink()
            raise ChunkError(f"{f['name']}: reassembled file does not match its sha256")
        tmp.replace(target)
        for c in f["chunks"]:
            (parts / c["name"]).unlink()
        status["complete"].append(f["name"])
    return status


def main(argv=None) -> int:
    """CLI: `split SRC PAYLOAD --chunk-mib N` or `assemble PAYLOAD STORE`."""
    p = argparse.ArgumentParser(prog="python bench/gpu/chunks.py", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("src", type=Path)
    s.add_argument("payload", type=Path)
    s.add_argument("--chunk-mib", type=float, default=60)
    a = sub.add_parser("assemble")
    a.add_argument("payload", type=Path)
    a.add_argument("store", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "split":
        m = split(args.src, args.payload, int(args.chunk_mib * MIB))
        print(f"{len(m['files'])} file(s) in {len(m['sets'])} set(s)")
        return 0
    try:
        status = assemble(args.payload, args.store)
    except ChunkError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps(status))
    return 0 if not status["missing"] else 3


if __name__ == "__main__":
    sys.exit(main())
