"""The web app in a real browser (Debian's chromium via playwright) against a real uvicorn on 127.0.0.1:
keyboard-only login and ranking with a tie, admin import -> assignment -> export download, a two-turn
demonstration, phone width without sideways scrolling. Screenshots of the key pages are saved as
artifacts (tests/web_browser.py says where)."""

from __future__ import annotations

import json
import re

import pytest
from helpers import live
from sqlalchemy import select
from web_browser import PHONE, artifacts_dir, browser_login, launch_chromium, no_horizontal_scroll
from web_helpers import add_user, make_app, task_lines

from chatforge.data.formats import Comparison
from chatforge.server.web import campaigns as cp
from chatforge.server.web.models import Assignment, Campaign, Ranking

PROMPTS = (json.dumps({"id": "p1", "messages": [{"role": "user", "content": "How do I boil an egg?"}]}) + "\n"
           + json.dumps("Name three primes.") + "\n")


@pytest.fixture(scope="module")
def browser():
    pw, b = launch_chromium()
    yield b
    b.close()
    pw.stop()


@pytest.fixture
def server(tmp_path):
    """(base URL, sessionmaker) of the web app on a fresh SQLite file, with an admin and two labelers."""
    app, sm = make_app(f"sqlite:///{tmp_path / 'app.db'}")
    for name, role in (("admin", "admin"), ("ann", "labeler"), ("bob", "labeler")):
        add_user(sm, name, role)
    with live(app) as base:
        yield base, sm


@pytest.fixture
def shots(tmp_path):
    return artifacts_dir(tmp_path)


def seed_campaign(sm, text: str, overlap: int = 1, name: str = "seeded") -> str:
    with sm() as db:
        c = Campaign(name=name, overlap=overlap, allow_ties=True)
        db.add(c)
        db.flush()
        cp.import_tasks(db, c, cp.parse_task_lines(text))
        db.commit()
        return c.id


def shown_letters(page) -> dict[str, str]:
    """{response content number: the letter it is shown under} read off the page."""
    out = {}
    for li in page.locator("li.reply").all():
        letter = li.locator("h2").inner_text().split()[-1]
        num = re.match(r"reply (\d) of", li.locator("pre").inner_text()).group(1)
        out[num] = letter
    return out


def test_rank_four_replies_with_a_tie_by_keyboard_only(browser, server, shots):
    base, sm = server
    seed_campaign(sm, task_lines(1, 4))
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    browser_login(page, base, "ann")
    page.goto(base + "/app/rank")
    assert re.search(r"/app/rank/asg_", page.url)
    letters = shown_letters(page)
    assert sorted(letters.values()) == ["A", "B", "C", "D"]
    page.evaluate("document.activeElement && document.activeElement.blur()")  # keys go to the page
    # reply 0 best, 1 and 2 tied, 3 worst; a wrong key and Backspace on the way
    page.keyboard.press(letters["0"])
    page.keyboard.press(letters["3"])
    page.keyboard.press("Backspace")
    page.keyboard.press(letters["1"])
    page.keyboard.press("=")
    page.keyboard.press(letters["2"])
    expected_text = f"{letters['0']}, {letters['1']}={letters['2']}"
    assert page.input_value("#ranking") == expected_text
    assert "still to place: " + letters["3"] in page.inner_text("#ranking-preview")
    page.keyboard.press("Enter")  # not every reply placed yet: nothing is submitted
    page.keyboard.press(letters["3"])
    assert page.input_value("#ranking") == expected_text + f", {letters['3']}"
    preview = re.sub(r"\s+", " ", page.inner_text("#ranking-preview"))  # the browser collapses spaces
    assert preview.startswith(f"Best to worst: {letters['0']} > {letters['1']} = {letters['2']} > {letters['3']}")
    assert page.locator("li.reply.picked").count() == 4
    page.screenshot(path=str(shots / "rank.png"), full_page=True)
    with sm() as db:
        assert db.scalar(select(Ranking)) is None
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "No ranking tasks left" in page.inner_text("main")
    with sm() as db:
        r = db.scalar(select(Ranking))
        a = db.get(Assignment, r.assignment_id)
    assert r.ranking == [["r0"], ["r1", "r2"], ["r3"]]
    # the order shown is stored with the ranking: letter i is shown_order[i]
    assert r.shown_order == a.shown_order
    assert {f"r{num}": r.shown_order["ABCD".index(letter)] for num, letter in letters.items()} == {
        f"r{i}": f"r{i}" for i in range(4)}
    assert not errors, errors
    ctx.close()


def test_admin_import_assignment_and_export_download(browser, server, shots, tmp_path):
    base, sm = server
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(task_lines(2, 3))
    admin = browser.new_context().new_page()
    browser_login(admin, base, "admin")
    assert admin.url.endswith("/app/admin")
    admin.screenshot(path=str(shots / "admin.png"), full_page=True)
    form = admin.locator("form[action='/app/admin/campaigns']")
    form.locator("input[name=name]").fill("browser campaign")
    form.locator("input[name=overlap]").fill("2")
    form.locator("input[name=tasks]").set_input_files(str(tasks))
    with admin.expect_navigation():
        form.locator("button[type=submit]").click()
    assert "Campaign browser campaign" in admin.inner_text("h1")
    assert "2 tasks, overlap 2" in admin.inner_text("main")
    # assignment: both labelers get both tasks (overlap 2), each ranks in the browser
    for name in ("ann", "bob"):
        page = browser.new_context().new_page()
        browser_login(page, base, name)
        for _ in range(2):
            page.goto(base + "/app/rank")
            letters = shown_letters(page)
            page.fill("#ranking", f"{letters['0']}, {letters['1']}, {letters['2']}")
            with page.expect_navigation():
                page.click("button[value=submit]")
        page.goto(base + "/app/rank")
        assert "No ranking tasks left" in page.inner_text("main")
        page.context.close()
    admin.reload()
    assert admin.inner_text("#pairwise") == "1.000"
    admin.screenshot(path=str(shots / "campaign.png"), full_page=True)
    with admin.expect_download() as dl:
        admin.click("text=raw rankings per labeler")
    path = dl.value.path()
    assert dl.value.suggested_filename.startswith("raw-cmp_")
    rows = [Comparison.from_dict(json.loads(line)) for line in open(path, encoding="utf-8")]
    assert len(rows) == 4 and {c.labeler for c in rows} == {"ann", "bob"}
    assert all(c.ranking == [["r0"], ["r1"], ["r2"]] and c.meta["campaign"] == "browser campaign" for c in rows)
    admin.context.close()


def test_write_a_two_turn_demonstration(browser, server, shots, tmp_path):
    from chatforge.server.web.demos import demo_conversations

    base, sm = server
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(PROMPTS)
    admin = browser.new_context().new_page()
    browser_login(admin, base, "admin")
    form = admin.locator("form[action='/app/admin/prompts']")
    form.locator("input[name=name]").fill("eggs")
    form.locator("input[name=prompts]").set_input_files(str(prompts))
    with admin.expect_navigation():
        form.locator("button[type=submit]").click()
    admin.context.close()
    page = browser.new_context().new_page()
    browser_login(page, base, "ann")
    page.goto(base + "/app/write")
    item = page.locator("li", has_text="How do I boil an egg?")
    with page.expect_navigation():
        item.locator("button").click()
    assert "/app/write/dem_" in page.url
    page.fill("textarea[name=turn_content_1]", "Put it in boiling water for 8 minutes.")
    with page.expect_navigation():
        page.click("button[value=add]")
    page.fill("textarea[name=turn_content_2]", "And soft-boiled?")
    with page.expect_navigation():
        page.click("button[value=add]")
    page.fill("textarea[name=turn_content_3]", "About 6 minutes.")
    page.screenshot(path=str(shots / "write.png"), full_page=True)
    with page.expect_navigation():
        page.click("button[value=submit]")
    assert "Submitted" in page.inner_text("main")
    with sm() as db:
        (conv,) = demo_conversations(db)
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", "How do I boil an egg?"), ("assistant", "Put it in boiling water for 8 minutes."),
        ("user", "And soft-boiled?"), ("assistant", "About 6 minutes.")]
    assert conv.meta["author"] == "ann" and conv.meta["prompt_set"] == "eggs"
    page.context.close()


def test_pages_fit_a_phone_without_sideways_scrolling(browser, server, shots):
    base, sm = server
    long_word = "x" * 300  # a reply with no break opportunity must wrap, not widen the page
    seed_campaign(sm, task_lines(1, 4, content=long_word))
    ctx = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    browser_login(page, base, "admin")
    for path in ("/app/", "/app/admin", "/app/write"):
        page.goto(base + path)
        assert no_horizontal_scroll(page), f"{path} scrolls sideways at 375 px"
    page.goto(base + "/app/rank")
    assert "/app/rank/asg_" in page.url
    assert no_horizontal_scroll(page), "the ranking page scrolls sideways at 375 px"
    box = page.locator("li.reply").first.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    page.screenshot(path=str(shots / "rank-phone.png"), full_page=True)
    ctx.close()


PAYLOADS = ("<script>window.__xss=1</script>", "<img src=x onerror=\"window.__xss=2\">",
            "javascript:window.__xss=3")
EVIL = " ".join(PAYLOADS)


def assert_inert(page, where: str) -> None:  # noqa: ANN001
    """Nothing the payloads carry ran or became markup: no global set, no dialog, no <img src=x>, no
    javascript: link; and the text is shown to the person as the literal characters."""
    assert page.evaluate("window.__xss === undefined"), f"a payload ran on {where}"
    assert page.locator("img[src='x']").count() == 0, f"an <img> was injected on {where}"
    assert page.locator("a[href^='javascript']").count() == 0, f"a javascript: link on {where}"
    assert page.evaluate("[...document.scripts].every(s => !s.text.includes('__xss'))"), where


def test_payloads_in_prompts_replies_comments_and_names_never_run(browser, server, shots, tmp_path):
    """<script>, <img onerror> and javascript: payloads as a campaign's name, a task's prompt and replies, a
    labeler's username, a ranking comment (saved as a draft, shown again), a prompt set's name and prompt and a
    demonstration's turn: every page that shows them, in chromium, shows the characters and runs nothing."""
    base, sm = server
    evil_name = "eve " + EVIL
    add_user(sm, evil_name, "labeler")
    tasks = json.dumps({"task_id": "x1", "prompt": {"messages": [{"role": "user", "content": "Q " + EVIL}]},
                        "responses": [{"response_id": f"r{j}", "content": f"reply {j} of x {EVIL}", "policy": "p"}
                                      for j in range(3)]}) + "\n"
    seed_campaign(sm, tasks, name="camp " + EVIL)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("P " + EVIL) + "\n")
    dialogs: list[str] = []
    admin = browser.new_context().new_page()
    admin.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    browser_login(admin, base, "admin")
    form = admin.locator("form[action='/app/admin/prompts']")
    form.locator("input[name=name]").fill("set " + EVIL)
    form.locator("input[name=prompts]").set_input_files(str(prompts))
    with admin.expect_navigation():
        form.locator("button[type=submit]").click()
    assert_inert(admin, "the admin page after the prompt import")

    page = browser.new_context().new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    browser_login(page, base, evil_name)
    assert_inert(page, "the home page")
    assert evil_name in page.inner_text("body")  # the name in the header, as text
    page.goto(base + "/app/rank")
    assert "/app/rank/asg_" in page.url
    assert_inert(page, "the ranking page")
    body = page.inner_text("main")
    assert "Q " + EVIL in body and f"reply 0 of x {EVIL}" in body
    page.fill("textarea[name=comment]", "c " + EVIL)
    page.wait_for_timeout(2500)  # the draft autosave (1 s after typing stops)
    page.reload()
    assert page.input_value("textarea[name=comment]") == "c " + EVIL  # the draft came back, as text
    assert_inert(page, "the ranking page with the saved draft")
    letters = shown_letters(page)
    page.fill("#ranking", ", ".join(letters[str(j)] for j in range(3)))
    with page.expect_navigation():
        page.click("button[value=submit]")
    page.goto(base + "/app/write")
    assert_inert(page, "the demonstration list")
    assert "P " + EVIL in page.inner_text("main")
    with page.expect_navigation():
        page.locator("li", has_text="P " + EVIL).locator("button").click()
    page.fill("textarea[name=turn_content_1]", "A " + EVIL)
    with page.expect_navigation():
        page.click("button[value=add]")
    assert_inert(page, "the demonstration being written")
    assert page.input_value("textarea[name=turn_content_1]") == "A " + EVIL
    page.context.close()

    admin.goto(base + "/app/admin")
    assert_inert(admin, "the admin page")
    assert evil_name in admin.inner_text("main") and "camp " + EVIL in admin.inner_text("main")
    with admin.expect_navigation():
        admin.locator("a", has_text="camp " + EVIL).first.click()
    assert_inert(admin, "the campaign page")
    assert evil_name in admin.inner_text("main")  # the labeler's row in the agreement dashboard
    admin.screenshot(path=str(shots / "campaign-payloads.png"), full_page=True)
    assert dialogs == []
    admin.context.close()


def test_rank_by_dragging_replies(browser, server):
    base, sm = server
    seed_campaign(sm, task_lines(1, 4))
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    browser_login(page, base, "ann")
    page.goto(base + "/app/rank")
    card = {letter: f"#reply-{letter}" for letter in "ABCD"}
    page.drag_and_drop(card["D"], card["A"])  # A not placed yet: D goes last (first)
    assert page.input_value("#ranking") == "D"
    page.drag_and_drop(card["B"], card["D"])  # B just above D
    page.drag_and_drop(card["C"], card["D"])  # C between B and D
    page.drag_and_drop(card["A"], card["B"])  # A to the top
    assert page.input_value("#ranking") == "A, B, C, D"
    page.drag_and_drop(card["D"], card["A"])  # D moved from the bottom to the top
    assert page.input_value("#ranking") == "D, A, B, C"
    with page.expect_navigation():
        page.click("button[value=submit]")
    with sm() as db:
        r = db.scalar(select(Ranking))
        shown = db.get(Assignment, r.assignment_id).shown_order
    assert r.ranking == [[shown[3]], [shown[0]], [shown[1]], [shown[2]]]
    page.context.close()
