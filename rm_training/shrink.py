"""Shrink a LoRA adapter to a lower rank: the best rank-k approximation of every layer's update.

    python -m rm_training.shrink ADAPTER_DIR OUT_DIR --rank 8

Each adapted layer's update delta = scaling * B @ A is replaced by its top-k singular directions
(Eckart-Young: the closest rank-k matrix in Frobenius norm), stored as B' = U_k sqrt(S_k) and
A' = sqrt(S_k) V_k^T with lora_alpha = r = k (scaling 1). Halving the rank halves the file.

Written here rather than through PEFT's own SVD path (`add_weighted_adapter(combination_type="svd")`):
peft 0.21 turns that path into a plain copy at the same rank when it is given a single adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from genarm_common.errors import SetupError
from genarm_common.folders import replaced_on_success

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ARM_INFO = "genarm_arm.json"
# Settings under which delta is not scaling * B @ A, or not one scaling for the whole adapter.
UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern")


@dataclass
class ShrinkReport:
    from_rank: int
    to_rank: int
    bytes_before: int
    bytes_after: int
    energy_kept: float  # share of the summed squared singular values kept, over every layer
    layers: dict[str, float] = field(default_factory=dict)  # the same share, per layer

    @property
    def lowest(self) -> tuple[str, float]:
        return min(self.layers.items(), key=lambda item: item[1])

    def as_dict(self) -> dict[str, object]:
        name, share = self.lowest
        return {"from_rank": self.from_rank, "to_rank": self.to_rank, "method": "SVD of scaling * B @ A per layer",
                "update_energy_kept": round(self.energy_kept, 4),
                "lowest_layer": {"name": name, "energy_kept": round(share, 4)},
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}


def _scaling(config: dict) -> float:
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def truncate_pair(a, b, scaling: float, rank: int):
    """(A', B', energy kept) for the rank-`rank` truncation of scaling * B @ A, in float32.

    Through two thin QR factorisations, so the SVD is of an r x r matrix even for an embedding's
    vocabulary-wide update: B = Qb Rb, A^T = Qa Ra, so B @ A = Qb (Rb Ra^T) Qa^T.
    """
    import torch

    q_b, r_b = torch.linalg.qr(b.float())
    q_a, r_a = torch.linalg.qr(a.float().T)
    u, s, vh = torch.linalg.svd(scaling * r_b @ r_a.T)
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    energy = s.square()
    return new_a, new_b, float(energy[:rank].sum() / energy.sum().clamp(min=1e-30)), energy


def shrink_adapter(adapter: Path, out: Path, rank: int) -> ShrinkReport:
    """Write `adapter` truncated to `rank` into `out` (replaced if it exists); SetupError when it cannot."""
    from safetensors.torch import load_file, save_file

    adapter, out = Path(adapter), Path(out)
    if not (adapter / CONFIG).is_file() or not (adapter / WEIGHTS).is_file():
        raise SetupError(f"{adapter}: not a PEFT LoRA adapter folder (needs {CONFIG} and {WEIGHTS})")
    config = json.loads((adapter / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise SetupError(f"{adapter}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be shrunk")
    if bad := [key for key in UNSUPPORTED if config.get(key)]:
        raise SetupError(f"{adapter}: {', '.join(bad)} set; only a plain LoRA (one rank, one alpha) can be shrunk")
    if not 0 < rank < config["r"]:
        raise SetupError(f"{adapter}: --rank must be between 1 and {config['r'] - 1} (the adapter's rank is {config['r']})")

    tensors = load_file(adapter / WEIGHTS)
    scaling, kept, total = _scaling(config), 0.0, 0.0
    layers: dict[str, float] = {}
    for key in sorted(k for k in tensors if ".lora_A." in k or ".lora_embedding_A" in k):
        b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        a, b = tensors[key], tensors[b_key]
        if a.dim() != 2:
            raise SetupError(f"{adapter}: {key} is not a matrix; only linear and embedding LoRA layers can be shrunk")
        new_a, new_b, share, energy = truncate_pair(a, b, scaling, rank)
        tensors[key], tensors[b_key] = new_a.to(a.dtype).contiguous(), new_b.to(b.dtype).contiguous()
        layers[key.split(".lora_")[0]] = share
        kept, total = kept + float(energy[:rank].sum()), total + float(energy.sum())
    if not layers:
        raise SetupError(f"{adapter}: no LoRA weights in {WEIGHTS}")

    with replaced_on_success(out) as tmp:
        for item in adapter.iterdir():
            if item.is_file() and item.name not in (WEIGHTS, CONFIG, ARM_INFO):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps({**config, "r": rank, "lora_alpha": rank, "use_rslora": False},
                                             indent=2) + "\n")
        report = ShrinkReport(config["r"], rank, (adapter / WEIGHTS).stat().st_size, (tmp / WEIGHTS).stat().st_size,
                              kept / max(total, 1e-30), layers)
        if (adapter / ARM_INFO).is_file():
            info = json.loads((adapter / ARM_INFO).read_text())
            if "lora" in info:
                info["lora"] = {**info["lora"], "r": rank, "alpha": rank}
            info["shrunk"] = report.as_dict()
            (tmp / ARM_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rm_training.shrink", description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--rank", type=int, required=True, help="the new LoRA rank (below the adapter's)")
    args = parser.parse_args(argv)
    try:
        report = shrink_adapter(Path(args.adapter_dir), Path(args.out_dir), args.rank)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name, share = report.lowest
    print(f"{args.out_dir}: rank {report.from_rank} -> {report.to_rank}, {report.bytes_before:,} -> "
          f"{report.bytes_after:,} bytes; update energy kept {report.energy_kept:.1%} "
          f"(lowest layer {share:.1%}: {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
