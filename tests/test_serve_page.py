"""The browser chat page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Skips when they are missing: `apt-get install -y chromium chromium-driver` and `pip install selenium`.
A failing test leaves a screenshot next to its temporary directory and names it in the failure message.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from tinymodels import write_hf_checkpoint

from hayai.serve.app import LOOPBACK_HOSTS, ServeSettings, create_app
from hayai.serve.background import BackgroundServer
from hayai.serve.scheduler import Scheduler

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="needs Chromium, ChromeDriver and selenium: apt-get install -y chromium chromium-driver && "
           ".venv/bin/pip install selenium")

NAME = "tiny-chat"
KEY = "page-key"


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_tokenizer):
    import hayai

    path = write_hf_checkpoint(tmp_path_factory.mktemp("page") / "tiny", tiny_tokenizer, max_position_embeddings=2048)
    return hayai.load(str(path), dtype="fp32")


@pytest.fixture(scope="module")
def served(llm):
    scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=4)
    settings = ServeSettings(model_name=NAME, api_key=KEY, allowed_hosts=LOOPBACK_HOSTS)
    with BackgroundServer(create_app(scheduler, llm.tokenizer, settings)) as server:
        yield server, scheduler


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@contextmanager
def screenshot_on_failure(driver, path: Path):
    try:
        yield
    except BaseException as exc:
        driver.save_screenshot(str(path))
        logs = ""
        with suppress(Exception):  # not every driver exposes logs
            logs = "\n".join(str(e) for e in driver.get_log("browser"))
        raise AssertionError(f"{exc}\nscreenshot: {path}\nbrowser log:\n{logs}") from exc


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def set_field(driver, element_id: str, value: str) -> None:
    # Set the value and fire 'change' as a user edit would (number inputs do not take send_keys reliably).
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'));", element_id, value)


def count_streamed_updates(driver) -> None:
    """Record every change to the assistant answer's text while it streams."""
    driver.execute_script("""
        window.updates = 0;
        new MutationObserver((records) => {
            for (const r of records) {
                const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
                if (el && el.closest('.message.assistant.streaming')) window.updates += 1;
            }
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)


def ask(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def answers(driver) -> list[dict]:
    """The assistant messages as {state, text, meta}, read in one script (the page re-renders its list)."""
    return driver.execute_script("""
        return [...document.querySelectorAll('.message.assistant')].map((el) => ({
            state: el.dataset.state,
            text: el.querySelector('.content').textContent,
            meta: (el.querySelector('.meta') || {}).textContent || ''}));""")


def test_a_question_gets_a_streamed_answer_with_its_speed(browser, served, llm, tmp_path):
    from selenium.webdriver.common.by import By

    server, _ = served
    question = next(q for q in ("Hello world", "How are you today?", "The quick brown fox", "Small models")
                    if len(llm.engine.generate(llm.prompt_ids([{"role": "user", "content": q}]),
                                               max_new_tokens=40).token_ids) >= 12)
    expected = llm.engine.generate(llm.prompt_ids([{"role": "user", "content": question}]), max_new_tokens=40)
    browser.get(server.url + "/")
    with screenshot_on_failure(browser, tmp_path / "chat-answer.png"):
        # The server wants a key: the page says so, and works once it is entered.
        wait_for(lambda: "API key" in browser.find_element(By.ID, "status").text, what="the API key prompt")
        set_field(browser, "api-key", KEY)
        wait_for(lambda: browser.execute_script("return document.getElementById('model').value") == NAME,
                 what="the model picker to list the served model")
        set_field(browser, "temperature", "0")
        set_field(browser, "max-tokens", "40")
        count_streamed_updates(browser)
        ask(browser, question)
        done = wait_for(lambda: [a for a in answers(browser) if a["state"] == "done"], what="the answer to finish")[0]
        assert done["text"] == expected.text
        assert browser.execute_script("return window.updates") > 1, "the answer arrived in one piece, not streamed"
        assert f"{len(expected.token_ids)} tokens" in done["meta"] and "tok/s" in done["meta"]
        # The conversation is kept in localStorage: it is still there after a reload.
        browser.refresh()
        wait_for(lambda: len(answers(browser)) == 1, what="the conversation to come back after a reload")
        assert answers(browser)[0]["text"] == expected.text
        assert question in browser.find_element(By.ID, "conversations").text


def test_the_stop_button_ends_the_answer_and_frees_the_server(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    server, scheduler = served
    cancelled = scheduler.stats().cancelled
    browser.get(server.url + "/")
    with screenshot_on_failure(browser, tmp_path / "chat-stop.png"):
        set_field(browser, "api-key", KEY)
        wait_for(lambda: browser.execute_script("return document.getElementById('model').value") == NAME,
                 what="the model list")
        set_field(browser, "max-tokens", "1900")
        # A long answer: the tiny model would end its turn early on its own, so ask the server to ignore EOS.
        browser.execute_script("""
            const original = window.fetch;
            window.fetch = (url, init) => {
                if (init && init.body) { const b = JSON.parse(init.body); b.ignore_eos = true;
                                         init = {...init, body: JSON.stringify(b)}; }
                return original(url, init);
            };""")
        ask(browser, "Tell me a long story")
        wait_for(lambda: any(a["text"] for a in answers(browser)), what="the first words")
        browser.find_element(By.ID, "stop").click()
        stopped = wait_for(lambda: [a for a in answers(browser) if a["state"] == "stopped"],
                           what="the answer to show it was stopped")[0]
        assert "stopped" in stopped["meta"]
        assert browser.find_element(By.ID, "send").is_enabled()
        wait_for(lambda: scheduler.stats().cancelled == cancelled + 1 and scheduler.stats().running == 0,
                 what="the server to cancel the request")
