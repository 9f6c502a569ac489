"""ARMs given as LoRA adapters are merged once into a cached HF folder the engine can load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from server.adapters import resolve_arms
from genarm_common.model_checks import check_fusion_setup


@pytest.fixture()
def adapter(tiny_family: dict[str, Path], tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_family["llama-arm-narrow"], dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter actually change the model
            torch.nn.init.normal_(param, std=0.5)
    out = tmp_path / "adapter"
    peft.save_pretrained(out)
    return out


def test_adapter_is_merged_once_and_matches_peft(
    adapter: Path, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "cache"))
    base = str(tiny_family["llama-base"])
    merged = Path(resolve_arms(base, {"harmless": str(adapter)})["harmless"])
    assert merged.is_relative_to(tmp_path / "cache") and (merged / "config.json").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.inference_mode():
        want = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_family["llama-arm-narrow"], dtype=torch.float32), adapter
        )(ids).logits
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
    adapter: Path, tiny_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENARM_CACHE", str(tmp_path / "cache"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    # The tiny narrow ARM and the base differ in shape: merging onto the base must fail clearly.
    from genarm_common.errors import SetupError

    with pytest.raises(SetupError, match="cannot merge"):
        resolve_arms(str(tiny_family["llama-base"]), {"harmless": str(adapter)})


def test_model_references_resolve_or_fail_in_one_line(tiny_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from genarm_common.errors import SetupError
    from genarm_common.model_fetch import resolve_model_ref

    assert resolve_model_ref(str(tiny_family["llama-base"])) == str(tiny_family["llama-base"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SetupError, match="hub download failed") as err:
        resolve_model_ref("no-such-org/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(SetupError, match="not a folder, a known name"):
        resolve_model_ref("./missing/folder")
