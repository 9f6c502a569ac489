"""ARMs given as LoRA adapters are merged once into a cached HF folder the engine can load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from genarm_common.errors import SetupError
from genarm_common.folders import publish_once, staging_dir
from genarm_common.model_checks import check_fusion_setup
from server.adapters import resolve_arms


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter on `model_dir` that changes the model (B starts at zero otherwise)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(out)
    return out


def peft_logits(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(model, adapter)(ids).logits


@pytest.fixture()
def adapter(tiny_family: dict[str, Path], tmp_path: Path) -> Path:
    return make_adapter(tiny_family["llama-arm-narrow"], tmp_path / "adapter")


def test_adapter_is_merged_once_and_matches_peft(
    adapter: Path, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "cache"))
    base = str(tiny_family["llama-base"])
    merged = Path(resolve_arms(base, {"harmless": str(adapter)})["harmless"])
    assert merged.is_relative_to(tmp_path / "cache") and (merged / "config.json").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    want = peft_logits(tiny_family["llama-arm-narrow"], adapter, ids)
    with torch.inference_mode():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # float32 base: merged in float32
    stamp = (merged / "config.json").stat().st_mtime_ns
    assert resolve_arms(base, {"harmless": str(adapter)})["harmless"] == str(merged)
    assert (merged / "config.json").stat().st_mtime_ns == stamp  # cached, not merged again
    check_fusion_setup(base, {"harmless": merged})  # the engine's start-up checks accept it


def test_plain_folders_pass_through(tiny_family: dict[str, Path]) -> None:
    arms = {"helpful": str(tiny_family["llama-arm-padded"])}
    assert resolve_arms(str(tiny_family["llama-base"]), arms) == arms


def test_adapter_of_a_missing_base_falls_back_to_the_serving_base(
    tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "cache"))
    # Trained on a copy of the base that is gone now (another machine's path).
    adapter = make_adapter(tiny_family["llama-base"], tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="genarm.adapters"):
        merged = Path(resolve_arms(str(tiny_family["llama-base"]), {"harmless": str(adapter)})["harmless"])
    assert any("merging onto the serving base" in r.getMessage() for r in caplog.records)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.inference_mode():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, peft_logits(tiny_family["llama-base"], adapter, ids), atol=1e-4, rtol=1e-4)


def test_an_adapter_that_does_not_fit_its_base_fails_in_one_line(
    adapter: Path, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "cache"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    # The narrow ARM's adapter does not fit the base's shapes: the merge fails clearly, nothing is cached.
    with pytest.raises(SetupError, match="cannot merge") as err:
        resolve_arms(str(tiny_family["llama-base"]), {"harmless": str(adapter)})
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "merged").iterdir())


def test_replicas_merging_the_same_adapter_at_once_share_one_folder(tmp_path: Path) -> None:
    """Two writers of one cached folder: the one that renames second keeps the first one's folder."""
    target = tmp_path / "merged" / "abc"
    first, second = staging_dir(target), staging_dir(target)
    (first / "config.json").write_text("{}")
    (second / "config.json").write_text("{}")
    assert publish_once(first, target) == target
    assert publish_once(second, target) == target  # rename onto a non-empty folder: the loser's copy goes
    assert (target / "config.json").is_file() and sorted(p.name for p in target.parent.iterdir()) == ["abc"]


def test_model_references_resolve_or_fail_in_one_line(tiny_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from genarm_common.model_fetch import resolve_model_ref

    assert resolve_model_ref(str(tiny_family["llama-base"])) == str(tiny_family["llama-base"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SetupError, match="hub download failed") as err:
        resolve_model_ref("no-such-org/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(SetupError, match="not a folder, a known name"):
        resolve_model_ref("./missing/folder")


def lora_updates(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Every adapted layer's update (scaling * B @ A), as PEFT computes it."""
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter)
    return {name: module.get_delta_weight("default").detach()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_shrink_keeps_each_layers_best_low_rank_update(
    adapter: Path, tiny_family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m rm_training.shrink`: every update becomes its closest rank-k matrix (Eckart-Young:
    the error is the norm of the dropped singular values), in a smaller adapter the server merges."""
    from rm_training.shrink import main as shrink_main

    model_dir = tiny_family["llama-arm-narrow"]
    out = tmp_path / "rank2"
    assert shrink_main([str(adapter), str(out), "--rank", "2"]) == 0
    assert "rank 4 -> 2" in capsys.readouterr().out
    full, shrunk = lora_updates(model_dir, adapter), lora_updates(model_dir, out)
    assert shrunk.keys() == full.keys() and len(full) == 3 * 3  # q, k, v in the three tiny layers
    for name, update in full.items():
        dropped = torch.linalg.svdvals(update)[2:]
        assert torch.linalg.matrix_norm(update - shrunk[name]).item() == pytest.approx(
            dropped.square().sum().sqrt().item(), rel=1e-3, abs=1e-6), name
        assert torch.linalg.matrix_rank(shrunk[name]).item() <= 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 2)
    assert (out / "adapter_model.safetensors").stat().st_size < (adapter / "adapter_model.safetensors").stat().st_size
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "cache"))
    base = str(tiny_family["llama-base"])
    check_fusion_setup(base, {"h": Path(resolve_arms(base, {"h": str(out)})["h"])})  # merged, accepted

    capsys.readouterr()
    assert shrink_main([str(adapter), str(tmp_path / "rank4"), "--rank", "4"]) == 1  # nothing to shrink
    assert capsys.readouterr().err.strip() == (
        f"error: {adapter}: --rank must be between 1 and 3 (the adapter's rank is 4)")
    assert not (tmp_path / "rank4").exists()
