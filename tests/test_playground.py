"""The playground page at `/`, in a real headless Chromium (Debian's package, driven by Playwright):
a person types a prompt and sees the base model and two adapters complete it side by side."""

import os
import shutil
import struct

import httpx
import pytest

from serving import KEY, greedy_text

pytest.importorskip("fastapi")

# `.ci/run` installs Chromium and sets this, so there the test fails instead of skipping
REQUIRED = os.environ.get("LORA_GPT2_REQUIRE_BROWSER") == "1"
CHROMIUM = os.environ.get("LORA_GPT2_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and none of Chromium's own calls home (the machine may be offline)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail("LORA_GPT2_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def test_the_page_is_static_and_served_without_a_key(server):
    response = httpx.get(server[0] + "/", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "<title>lora-gpt2 playground</title>" in response.text
    assert "http://" not in response.text and "https://" not in response.text  # nothing from elsewhere


def test_columns_stream_the_same_text_as_the_api(browser, server, world, tmp_path):
    _, _, singles = world
    prompt, max_tokens = "Shall I compare thee", 24
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server[0] + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")  # the models are listed once the key is known
    page.wait_for_function("document.querySelectorAll('.column select').length === 3 && "
                           "document.querySelector('.column select').options.length === 3")
    assert page.eval_on_selector_all(".column select", "s => s.map(x => x.value)") == ["tiny-base", "poems", "plays"]
    page.fill("#prompt", prompt)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click("#go")
    page.wait_for_function("document.body.dataset.finished === '1'", timeout=60_000)

    states = page.eval_on_selector_all(".column pre", "p => p.map(x => x.dataset.state)")
    texts = page.eval_on_selector_all(".column pre .text", "t => t.map(x => x.textContent)")
    shown_prompts = page.eval_on_selector_all(".column pre .prompt", "t => t.map(x => x.textContent)")
    footers = page.eval_on_selector_all(".column footer", "f => f.map(x => x.textContent)")
    assert states == ["done"] * 3
    assert shown_prompts == [prompt] * 3
    client = httpx.Client(base_url=server[0], headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    for name, text, footer in zip(("tiny-base", "poems", "plays"), texts, footers):
        api = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0}).json()["choices"][0]["text"]
        assert text == api == greedy_text(singles, None if name == "tiny-base" else name, prompt, max_tokens)
        assert f"{name} · {max_tokens} tokens" in footer and footer.endswith("length")
    assert texts[1] != texts[0] and texts[2] != texts[0]  # the adapters do change the text
    assert all(url.startswith(server[0]) for url in requests)  # no CDN, nothing outside the server

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert png_size(data) >= (1280, 720) and len(data) > 20_000  # a rendered page, not a blank one
    if os.environ.get("LORA_GPT2_SCREENSHOT_DIR"):  # a copy to look at
        shutil.copy(shot, os.environ["LORA_GPT2_SCREENSHOT_DIR"])
    page.close()


def test_a_wrong_key_is_shown_on_the_page(browser, server):
    page = browser.new_page()
    page.goto(server[0] + "/")
    page.wait_for_function("document.getElementById('notice').textContent.includes('API key')")
    assert "missing or wrong API key" in page.text_content("#notice")
    page.close()


def test_a_watched_run_shows_its_step_and_reload_shows_the_next(browser, world, tmp_path):
    from lora_gpt2 import load_pretrained
    from lora_gpt2.checkpoints import adapter_dir
    from lora_gpt2.config import LoRAConfig
    from lora_gpt2.serve.watch import Watch

    from helpers import randomize_adapters
    from serving import base_engine, running_server

    base, _, _ = world
    config = LoRAConfig(targets=("attn",), r=4, alpha=8.0)
    models = {step: randomize_adapters(load_pretrained(base, lora=config).eval(), seed=step, scale=0.1)
              for step in (4, 8)}
    engine = base_engine(base).start()
    try:
        watch = Watch(engine, "live", tmp_path / "run", "best")
        adapter_dir.save_checkpoint(tmp_path / "run" / "best", models[4], None, step=4)
        assert watch.check()
        with running_server(engine) as url:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelectorAll('.column select').length === 3 && "
                                   "document.querySelector('.column select').options.length === 2")
            labels = page.eval_on_selector_all(".column:nth-child(2) option", "o => o.map(x => x.textContent)")
            assert labels == ["(off)", "tiny-base", "live · step 4 (live)"]
            adapter_dir.save_checkpoint(tmp_path / "run" / "best", models[8], None, step=8)
            assert watch.check()
            page.click("#reload")
            page.wait_for_function("[...document.querySelectorAll('.column:nth-child(2) option')]"
                                   ".some(o => o.textContent === 'live · step 8 (live)')")
            assert page.eval_on_selector(".column:nth-child(2) select", "s => s.value") == "live"  # kept
            page.fill("#prompt", "Once upon")
            page.fill("#max_tokens", "10")
            page.click("#go")
            page.wait_for_function("document.body.dataset.finished === '1'", timeout=60_000)
            footer = page.text_content(".column:nth-child(2) footer")
            assert footer.startswith("live (step-8) · 10 tokens")
            assert page.text_content(".column:nth-child(2) pre .text") == greedy_text(models, 8, "Once upon", 10)
            page.close()
    finally:
        engine.stop()


def test_chat_mode_keeps_each_columns_conversation_and_equals_the_chat_api(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(server[0] + "/")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('.column select').length === 3 && "
                           "document.querySelector('.column select').options.length === 3")
    page.select_option("#mode", "chat")
    assert page.is_visible("#system") and page.text_content("#go") == "Send"
    page.fill("#system", "Be brief.")
    page.fill("#max_tokens", "8")
    page.fill("#temperature", "0")
    client = httpx.Client(base_url=server[0], headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    histories = {name: [{"role": "system", "content": "Be brief."}] for name in ("tiny-base", "poems", "plays")}
    for n, message in enumerate(["Who goes there?", "Speak again."], start=1):
        page.fill("#prompt", message)
        page.click("#go")
        page.wait_for_function(f"document.body.dataset.finished === '{n}'", timeout=60_000)
        assert page.input_value("#prompt") == ""  # sent: the box is empty for the next message
        texts = page.eval_on_selector_all(".column pre .text", "t => t.map(x => x.textContent)")
        footers = page.eval_on_selector_all(".column footer", "f => f.map(x => x.textContent)")
        shown = page.eval_on_selector_all(".column pre", "p => p.map(x => x.querySelectorAll('.turn').length)")
        for (name, history), text, footer, turns in zip(histories.items(), texts, footers, shown):
            history.append({"role": "user", "content": message})
            api = client.post("/v1/chat/completions", json={"model": name, "messages": history, "max_tokens": 8,
                                                            "temperature": 0}).json()["choices"][0]
            assert text == api["message"]["content"] and f"{name} · 8 tokens" in footer
            history.append({"role": "assistant", "content": text})
            assert turns == 2 * n - 1  # the turns before, and the message just sent
    page.click("#clear")
    assert page.eval_on_selector_all(".column pre .turn", "t => t.length") == 0
    page.close()
