"""The web chat page in a real headless Chromium (Debian's, driven by Playwright), against the
real web adapter, a real inference worker on the tiny model and a real Redis."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_web import KEYS, WebThreads, make_settings, serving

from adapters.web import THANKS_UP

CHROMIUM = Path("/usr/bin/chromium")
README_SHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "web-chat.png"
TIMEOUT_MS = 60_000
FAQ_QUESTION = "Do I need a GPU?"
FAQ_ANSWER = "No: sprbot runs in bf16 on Xeon CPUs."
QUESTION = "How do I teach it our FAQ?"


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    with serving(tiny_model, tmp_path_factory.mktemp("web-page") / "data") as stack:
        yield stack


@pytest.fixture
def run_web():
    threads = WebThreads()
    yield threads.web
    threads.stop_all()


@pytest.fixture
def web(served, run_web):
    return run_web(make_settings(served.redis_url, served.data_dir))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 560})
    yield context.new_page()
    context.close()


def send(page, text: str):
    """Type ``text`` and press Enter; returns the bot message that answers it, once done."""
    answers = page.locator(".msg.bot")
    before = answers.count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = answers.nth(before)
    answer.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function(
        "(el) => el.dataset.state !== 'streaming'", arg=answer.element_handle(), timeout=TIMEOUT_MS
    )
    return answer


def test_the_page_streams_answers_keeps_the_conversation_and_a_thumbs_up_feeds_the_faq(
    web, page, tmp_path
):
    web.stores.faq.add(FAQ_QUESTION, FAQ_ANSWER, source="admin", author="test", status="approved")
    page.goto(web.url)

    grounded = send(page, FAQ_QUESTION)
    assert grounded.get_attribute("data-state") == "done"
    assert grounded.locator(".text").text_content() == "From the team FAQ: " + FAQ_ANSWER

    with page.expect_request("**/v1/chat/completions") as sent:
        answer = send(page, QUESTION)
    body = sent.value.post_data_json
    assert body["stream"] is True
    # The page holds the conversation: the first exchange travels with the second question.
    first_answer = "From the team FAQ: " + FAQ_ANSWER
    assert [m["content"] for m in body["messages"]] == [FAQ_QUESTION, first_answer, QUESTION]
    expected = web.client().chat.completions.create(model="sprbot", messages=body["messages"])
    text = answer.locator(".text").text_content()
    assert text == expected.choices[0].message.content  # greedy: the same answer, streamed
    # role, at least two pieces of text, finish, usage: it arrived as a stream
    assert int(answer.get_attribute("data-chunks")) >= 5
    assert (
        answer.locator(".meta span")
        .first.text_content()
        .endswith(
            f"{expected.usage.completion_tokens} tokens"
            + (" (cut short)" if expected.choices[0].finish_reason == "length" else "")
        )
    )

    answer.locator("button.rate-up").click()
    thanks = answer.locator(".thanks")
    thanks.wait_for(timeout=TIMEOUT_MS)
    assert thanks.text_content() == THANKS_UP
    assert answer.locator("button.rate-up").is_disabled()
    [candidate] = web.stores.faq.entries("candidate")
    assert (candidate.question, candidate.answer) == (QUESTION, text)
    assert (candidate.source, candidate.author) == ("feedback", "web:local")

    shot = tmp_path / "web-chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    if not README_SHOT.exists():  # once, for the README
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, README_SHOT)


def test_commands_answer_in_the_page_and_reset_starts_a_new_conversation(web, page):
    page.goto(web.url)
    help_reply = send(page, "/help")
    assert "/faq list" in help_reply.locator(".text").text_content()
    assert help_reply.locator("button").count() == 0  # a command's reply is not rated

    send(page, QUESTION)
    page.fill("#input", "/reset")
    page.press("#input", "Enter")
    page.locator(".msg.note", has_text="Conversation cleared").wait_for(timeout=TIMEOUT_MS)
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "And now?")
    assert sent.value.post_data_json["messages"] == [{"role": "user", "content": "And now?"}]


def test_with_keys_the_page_asks_for_one_and_then_answers(served, run_web, page):
    web = run_web(make_settings(served.redis_url, served.data_dir, web_api_keys=KEYS))
    page.goto(web.url)
    refused = send(page, QUESTION)
    assert refused.get_attribute("data-state") == "error"
    assert "No API key" in refused.locator(".text").text_content()
    assert page.locator("#key-bar").is_visible()

    page.fill("#key", KEYS[0])
    page.click("#save-key")
    answered = send(page, QUESTION)
    assert answered.get_attribute("data-state") == "done"
    assert answered.locator(".text").text_content()
    assert not page.locator("#key-bar").is_visible()
