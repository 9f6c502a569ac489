"""What a run leaves behind for the server: a LoRA adapter and/or a plain HF folder, each with
a small `genarm_arm.json` beside it.

    out/adapter/   PEFT adapter (adapter_config.json + adapter_model.safetensors) + tokenizer
    out/merged/    plain HF folder (safetensors + tokenizer): the LoRA merged into the model
                   (--merge), or the model itself for a full fine-tune
    */genarm_arm.json   dimension, base model, tokenizer hash, beta_r, data, metrics, command

`python -m rm_training.export ADAPTER_DIR OUT_DIR [--base PATH]` merges an adapter later.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from genarm_common.folders import make_shared, replaced_on_success
from genarm_common.lora_merge import merge_lora, recorded_base

ARM_INFO = "genarm_arm.json"
ARM_INFO_FORMAT = "genarm-arm/1"


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_arm_info(folder: Path, info: dict[str, Any], kind: str) -> Path:
    payload = {"format": ARM_INFO_FORMAT, "kind": kind, **info}
    path = folder / ARM_INFO
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def finish_folder(folder: Path, info: dict[str, Any], kind: str) -> None:
    """genarm_arm.json + a short README; drop the Trainer's pickled arguments; files readable by all."""
    (folder / "training_args.bin").unlink(missing_ok=True)
    write_arm_info(folder, info, kind)
    what = "a PEFT LoRA adapter" if kind == "lora_adapter" else "a plain Hugging Face model folder"
    (folder / "README.md").write_text(
        f"# GenARM autoregressive reward model: `{info.get('dimension')}`\n\n"
        f"{what.capitalize()}, trained with `genarm-train` (rm_training) from `{info.get('trained_from')}`.\n"
        "Reward of a response: the sum of its token log-probs under this model; trained with the\n"
        "reference-free loss -log sigmoid(beta_r * (r(chosen) - r(rejected))).\n\n"
        f"Serve it beside its base: `genarm-serve --base BASE --arm {info.get('dimension')}=THIS_FOLDER`.\n"
        "Training data, split, metrics and the command are in `genarm_arm.json`.\n"
    )
    make_shared(folder)


def read_arm_info(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / ARM_INFO).read_text())


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | Path | None = None,
    dtype: str = "auto",
    info: dict[str, Any] | None = None,
) -> Path:
    """Merge the adapter into its base (genarm_common.lora_merge), save a plain HF folder with its
    genarm_arm.json; an existing out_dir is replaced."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if info is None and (adapter_dir / ARM_INFO).is_file():
        info = read_arm_info(adapter_dir)
    if base is None:
        base = (info or {}).get("trained_from") or recorded_base(adapter_dir)
    with replaced_on_success(out_dir) as tmp:
        merge_lora(adapter_dir, Path(base), tmp, dtype)
        info = {k: v for k, v in (info or {}).items() if k not in ("format", "kind")}
        finish_folder(tmp, info, "merged")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_training.export",
                                     description="Merge a trained ARM adapter into a plain HF folder.")
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--base", help="the model the adapter was trained from (default: from genarm_arm.json)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = merge_adapter(args.adapter_dir, args.out_dir, args.base, args.dtype)
    print(f"merged ARM written to {out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
