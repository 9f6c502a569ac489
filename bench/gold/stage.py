"""Carrying GGUF files to the GPU machine in parts, and bringing big files back in parts.

What travels with one device call is at most 64 MiB, the tracked tree (~25 MB) included, so a GGUF
goes in parts of at most ~37 MB, one carry folder each (`.gpu-*` folders are git-ignored). Every
folder holds its part and `parts.json` (the part's index, count and sha256, so a part damaged in
transit is caught by the call that carried it); the joined file is checked against the sha256
pinned in genarm_common.model_fetch (the trust anchor), then converted once to an HF folder.

Here (network; the verified GGUFs come from genarm_common.model_fetch):
    python -m bench.gold.stage split qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct --prefix .gpu-w2s
    python -m bench.gold.stage calls --prefix .gpu-w2s        # the device calls, one line each
On the GPU machine, one call per folder (carry .gpu-w2sNN), back to back:
    python3 -m bench.gold.stage park .gpu-w2sNN               # checks the part, moves it to /tmp/genarm-stage
Then the run joins them (bench.gold.weak_to_strong --gguf-parts /tmp/genarm-stage), or by hand:
    python3 -m bench.gold.stage join qwen2.5-coder-1.5b-instruct --parts /tmp/genarm-stage --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from genarm_common.model_fetch import FetchError, known_model, sha256_file, verify_sha256

STAGE = Path("/tmp/genarm-stage")
PART_BYTES = 37_000_000  # with the ~25 MB tree, under the 64 MiB a call carries
MANIFEST = "parts.json"
CHUNK = 1 << 20


def part_name(name: str, index: int, count: int) -> str:
    return f"{name}.part{index:03d}of{count:03d}"


def split_file(path: Path, max_bytes: int, into: list[Path] | None = None) -> list[Path]:
    """Cut `path` into pieces of at most max_bytes named <name>.partIIIofNNN: beside it, or piece i
    into folder into[i]. Returns the pieces in order."""
    size = path.stat().st_size
    count = max(1, -(-size // max_bytes))
    if into is not None and len(into) != count:
        raise ValueError(f"{path.name}: {count} pieces, {len(into)} folders")
    pieces = []
    with open(path, "rb") as src:
        for i in range(count):
            folder = into[i] if into is not None else path.parent
            folder.mkdir(parents=True, exist_ok=True)
            piece = folder / part_name(path.name, i + 1, count)
            piece.write_bytes(src.read(max_bytes))
            pieces.append(piece)
    return pieces


def split_models(names: list[str], prefix: str, part_bytes: int = PART_BYTES) -> list[Path]:
    """Here: each model's verified GGUF in parts, one carry folder per part (<prefix>00, 01, ...)."""
    from genarm_common.model_fetch import fetch_gguf

    folders: list[Path] = []
    for name in names:
        gguf = fetch_gguf(name)
        mine = carry_folders(gguf, name, prefix, len(folders), part_bytes)
        folders += mine
        print(f"[stage] {gguf.name}: {len(mine)} parts in {mine[0]} .. {mine[-1]}", flush=True)
    return folders


def carry_folders(gguf: Path, name: str, prefix: str, start: int, part_bytes: int = PART_BYTES) -> list[Path]:
    """One folder per part, <prefix><start>, <prefix><start + 1>, ..., each with its manifest."""
    count = max(1, -(-gguf.stat().st_size // part_bytes))
    folders = [Path(f"{prefix}{start + i:02d}") for i in range(count)]
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)
    for i, piece in enumerate(split_file(gguf, part_bytes, folders)):
        entry = {"model": known_model(name).name, "file": piece.name, "index": i + 1, "count": count,
                 "bytes": piece.stat().st_size, "sha256": sha256_file(piece)}
        (piece.parent / MANIFEST).write_text(json.dumps([entry], indent=1) + "\n")
    return folders


def park(folders: list[Path], stage: Path = STAGE) -> list[Path]:
    """On the device: check each carried part against its manifest and move it into `stage`."""
    stage.mkdir(parents=True, exist_ok=True)
    parked = []
    for folder in folders:
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise FetchError(f"{folder}: no {MANIFEST} (not a folder written by `stage split`)")
        for entry in json.loads(manifest.read_text()):
            source, target = folder / entry["file"], stage / entry["file"]
            if target.is_file() and target.stat().st_size == entry["bytes"] and sha256_file(target) == entry["sha256"]:
                parked.append(target)  # already parked by an earlier call
                continue
            verify_sha256(source, entry["sha256"], f"part {entry['file']} (damaged in transit: carry it again)")
            shutil.copyfile(source, target)
            parked.append(target)
            print(f"[stage] parked {entry['file']} ({entry['bytes'] / 1e6:.0f} MB) in {stage}", flush=True)
    return parked


def join_gguf(name: str, folders: list[Path], out_dir: Path) -> Path:
    """Every part of the model's GGUF from `folders`, in order, joined and checked against the pinned sha256."""
    model = known_model(name)
    parts = {p.name: p for f in folders for p in f.glob(f"{model.gguf_name}.part*of*")}
    counts = {n.rsplit("of", 1)[-1] for n in parts}
    if len(counts) != 1:
        raise FetchError(f"{model.gguf_name}: no parts, or parts of different splits, in {folders}")
    count = int(counts.pop())
    missing = [i for i in range(1, count + 1) if part_name(model.gguf_name, i, count) not in parts]
    if missing:
        raise FetchError(f"{model.gguf_name}: parts {missing} of {count} are not in {folders} (if the machine went "
                         "cold between calls, /tmp was wiped: carry every part again, back to back)")
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = out_dir / model.gguf_name
    with open(gguf, "wb") as dst:
        for i in range(1, count + 1):
            with open(parts[part_name(model.gguf_name, i, count)], "rb") as src:
                shutil.copyfileobj(src, dst, CHUNK)
    verify_sha256(gguf, model.gguf_sha256, f"joined {model.gguf_name}")
    print(f"[stage] joined and verified {gguf} ({count} parts)", flush=True)
    return gguf


def model_from_parts(name: str, folders: list[Path], work: Path) -> Path:
    """The HF folder of a known model from its carried parts: joined, checked, converted once (cached in work)."""
    from genarm_common.model_fetch import convert_gguf

    model = known_model(name)
    folder = work / "models" / model.name
    if not (folder / "config.json").is_file():
        gguf = join_gguf(name, folders, work / "gguf")
        convert_gguf(gguf, folder, source={"name": model.name, "licence": model.licence})
        gguf.unlink()  # the HF folder is what is used from here on
    return folder


def device_calls(prefix: str) -> list[str]:
    """One line per staging call: what to carry and the command (for the README and the operator)."""
    folders = sorted(Path(".").glob(f"{prefix.removeprefix('./')}[0-9][0-9]"))
    return [f"carry {f.name}:  python3 -m bench.gold.stage park {f.name}" for f in folders]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gold.stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("split", help="here: the verified GGUFs of known models into carry folders")
    p.add_argument("models", nargs="+")
    p.add_argument("--prefix", default=".gpu-w2s", help="carry folders <prefix>00, <prefix>01, ... (git-ignored)")
    p.add_argument("--part-bytes", type=int, default=PART_BYTES)
    p = sub.add_parser("calls", help="here: list the staging device calls for the carry folders")
    p.add_argument("--prefix", default=".gpu-w2s")
    p = sub.add_parser("park", help="device: check carried parts and move them into the stage folder")
    p.add_argument("folders", nargs="+")
    p.add_argument("--stage", default=str(STAGE))
    p = sub.add_parser("join", help="device: join a model's parts, check the pinned sha256, convert to an HF folder")
    p.add_argument("model")
    p.add_argument("--parts", nargs="+", default=[str(STAGE)])
    p.add_argument("--out", required=True, help="work folder: the HF folder lands in OUT/models/<model>")
    args = parser.parse_args(argv)
    try:
        if args.verb == "split":
            split_models(args.models, args.prefix, args.part_bytes)
        elif args.verb == "calls":
            print("\n".join(device_calls(args.prefix)))
        elif args.verb == "park":
            park([Path(f) for f in args.folders], Path(args.stage))
        else:
            print(model_from_parts(args.model, [Path(p) for p in args.parts], Path(args.out)))
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
