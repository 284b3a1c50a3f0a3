"""Splitting long answers and pacing edits: what every chat platform shows."""

from __future__ import annotations

import pytest

from bot.render import Throttle, fenced_segments, split_text


def _fences_balanced(part: str) -> bool:
    return all(
        not is_code or seg.rstrip().endswith("```") for is_code, seg in fenced_segments(part)
    )


def test_short_text_is_one_part_and_empty_text_none():
    assert split_text("  hello\n", 100) == ["hello"]
    assert split_text(" \n ", 100) == []


def test_parts_are_cut_between_paragraphs_and_lose_nothing():
    paragraphs = [f"Paragraph {i}: " + "word " * 30 for i in range(20)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    parts = split_text(text, 500)
    assert len(parts) > 1
    assert all(len(p) <= 500 for p in parts)
    assert "\n\n".join(parts) == text  # every cut fell on a paragraph break
    assert all(p.startswith("Paragraph") for p in parts)


def test_a_code_block_that_fits_is_never_cut():
    code = "```python\n" + "\n".join(f"x{i} = {i}" for i in range(30)) + "\n```"
    text = "Intro paragraph.\n\n" + "filler " * 60 + "\n\n" + code + "\n\nAfter the code."
    parts = split_text(text, 420)
    assert any(code in p for p in parts)
    assert all(len(p) <= 420 and _fences_balanced(p) for p in parts)


def test_a_code_block_too_long_for_one_part_is_fenced_again_in_each():
    lines = [f"    print('line {i:03d}')" for i in range(200)]
    text = "Here is the script:\n\n```python\n" + "\n".join(lines) + "\n```\n\nDone."
    parts = split_text(text, 600)
    code_parts = [p for p in parts if "print(" in p]
    assert len(code_parts) > 3
    for part in code_parts:
        assert len(part) <= 600
        code = [seg for is_code, seg in fenced_segments(part) if is_code]
        assert len(code) == 1
        assert code[0].startswith("```python\n") and code[0].rstrip().endswith("\n```")
    assert parts[0] == "Here is the script:" and parts[-1].endswith("```\n\nDone.")
    # Every line survives, whole and in order, with its indentation.
    shown = [line for p in code_parts for line in p.split("\n") if "print(" in line]
    assert shown == lines


def test_a_line_without_spaces_longer_than_the_limit_is_cut_anyway():
    text = "x" * 250 + " tail"
    parts = split_text(text, 100)
    assert all(len(p) <= 100 for p in parts)
    assert "".join(parts).replace(" ", "") == text.replace(" ", "")


def test_long_prose_lines_are_cut_between_words():
    text = " ".join(f"w{i}" for i in range(400))
    parts = split_text(text, 120)
    assert all(len(p) <= 120 for p in parts)
    assert " ".join(parts).split() == text.split()


def test_fenced_segments_round_trip_and_an_open_fence_runs_to_the_end():
    text = "a\n```js\nlet x = 1\n```\nb ```inline``` c\n~~~\nopen"
    segments = fenced_segments(text)
    assert "".join(s for _, s in segments) == text
    assert [c for c, _ in segments] == [False, True, False, True]
    assert segments[3][1] == "~~~\nopen"


def test_split_text_refuses_a_useless_limit():
    with pytest.raises(ValueError, match="at least 32"):
        split_text("text", 10)


def test_throttle_paces_each_key_and_backs_off_all_of_them():
    now = [100.0]
    throttle = Throttle(1.0, clock=lambda: now[0])
    assert throttle.wait_s("a") == 0
    throttle.sent("a")
    assert throttle.wait_s("a") == pytest.approx(1.0)
    assert throttle.wait_s("b") == 0  # another message is not held back by "a"
    now[0] += 0.4
    assert throttle.wait_s("a") == pytest.approx(0.6)
    throttle.back_off(5.0)  # a 429 with Retry-After: 5
    assert throttle.wait_s("a") == pytest.approx(5.0)
    assert throttle.wait_s("b") == pytest.approx(5.0)
    now[0] += 5.0
    assert throttle.wait_s("a") == throttle.wait_s("b") == 0
    throttle.forget("a")
    assert throttle.wait_s("a") == 0


def test_a_back_off_for_one_key_holds_only_that_key():
    now = [100.0]
    throttle = Throttle(1.0, clock=lambda: now[0])
    throttle.back_off(3.0, key="chat-1")  # Telegram: a 429 in one chat
    assert throttle.wait_s("chat-1") == pytest.approx(3.0)
    assert throttle.wait_s("chat-2") == 0
    throttle.sent("chat-1")
    throttle.forget("chat-1")  # its message is done; the chat stays paused
    assert throttle.wait_s("chat-1") == pytest.approx(3.0)
    now[0] += 3.0
    assert throttle.wait_s("chat-1") == 0
