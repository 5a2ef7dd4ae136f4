"""The labeling service: the SQLite store (order per labeler, idempotency, conflicts, restarts, export), the HTTP
API on Serve (401 without a key, items, next, labels, export), and the page in a real headless chromium, with the
service restarted between two labels."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest

from trustray.data.label_store import LabelConflict, LabelStore, UnknownItem, shown_swapped
from trustray.data.preferences import normalise_preference

ITEMS = [{"id": f"pair-{i}", "prompt": f"Question {i}?", "a": f"answer a{i}", "b": f"answer b{i}", "budget": 4}
         for i in range(4)]
LABELER_KEY, ADMIN_KEY = "labeler-key-1", "admin-key-123"


def test_store_maps_display_order_back_and_counts_a_label_once(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    assert store.add_items(ITEMS) == 4 and store.add_items(ITEMS[:2]) == 0
    shown = store.next_item("ann")
    assert shown.item_id == "pair-0" and shown.prompt == [{"role": "user", "content": "Question 0?"}]
    assert (shown.first, shown.second) == (("answer b0", "answer a0") if shown.swapped else ("answer a0", "answer b0"))
    assert shown.swapped == shown_swapped("pair-0", "ann")
    label, new = store.submit("pair-0", "ann", "first", "key-0000")
    assert new and label == ("b" if shown.swapped else "a")
    assert store.submit("pair-0", "ann", "first", "key-0000") == (label, False)  # the same request again
    with pytest.raises(LabelConflict):
        store.submit("pair-0", "ann", "second", "key-0001")  # a different answer to the same item
    with pytest.raises(LabelConflict):
        store.submit("pair-1", "ann", "tie", "key-0000")  # a key reused for another label
    with pytest.raises(UnknownItem):
        store.submit("nope", "ann", "tie", "key-0002")
    with pytest.raises(ValueError, match="choice"):
        store.submit("pair-1", "ann", "best", "key-0003")
    assert store.next_item("bob").item_id == "pair-1"
    # A new connection (a restarted service) sees everything.
    again = LabelStore(tmp_path / "labels.sqlite")
    assert again.counts() == {"items": 4, "labelled": 1, "labels": 1}
    rows = again.export_rows()
    assert len(rows) == 1 and rows[0]["item_id"] == "pair-0" and rows[0]["budget"] == 4
    assert normalise_preference(rows[0])["chosen"][0]["content"] == f"answer {label}0"


def test_concurrent_duplicate_submissions_store_one_label(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite")
    store.add_items(ITEMS)
    results = []

    def submit() -> None:
        results.append(LabelStore(tmp_path / "labels.sqlite").submit("pair-2", "ann", "tie", "same-key-1"))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(new for _, new in results) == [False] * 7 + [True]
    assert store.counts()["labels"] == 1


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory, free_port):
    """One service for the module's tests (starting Serve costs more than the tests)."""
    from trustray.serve_apps.labeling import LabelingConfig, run_app, shutdown

    config = LabelingConfig(port=free_port, db=str(tmp_path_factory.mktemp("labels") / "labels.sqlite"),
                            labelers={"ann": LABELER_KEY}, labelers_env=None, admin_key=ADMIN_KEY)
    url = run_app(config)
    yield url, config
    shutdown()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_http_api(service):
    url, _ = service
    api = url.rstrip("/")
    assert httpx.get(f"{api}/next").status_code == 401
    assert httpx.get(f"{api}/next", headers=_auth("wrong-key-0")).status_code == 401
    assert httpx.post(f"{api}/items", json={"items": ITEMS}, headers=_auth(LABELER_KEY)).status_code == 401
    assert httpx.post(f"{api}/items", json={"items": ITEMS}, headers=_auth(ADMIN_KEY)).json() == {"added": 4}
    shown = httpx.get(f"{api}/next", headers=_auth(LABELER_KEY)).json()
    assert shown["item"]["id"] == "pair-0" and shown["items"] == 4 and shown["labelled"] == 0
    body = {"item_id": "pair-0", "choice": "second", "idempotency_key": "abcdef-123"}
    first = httpx.post(api, json=body, headers=_auth(LABELER_KEY))
    assert first.status_code == 200 and first.json()["duplicate"] is False
    again = httpx.post(api, json=body, headers=_auth(LABELER_KEY))
    assert again.json() == {**first.json(), "duplicate": True}
    conflict = httpx.post(api, json={**body, "choice": "first", "idempotency_key": "abcdef-999"},
                          headers=_auth(LABELER_KEY))
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflict"
    bad = httpx.post(api, json={**body, "choice": "best"}, headers=_auth(LABELER_KEY))
    assert bad.status_code == 400 and "choice" in bad.json()["error"]["message"]
    missing = httpx.post(api, json={**body, "item_id": "nope", "idempotency_key": "abcdef-777"},
                         headers=_auth(LABELER_KEY))
    assert missing.status_code == 404
    exported = httpx.get(f"{api}/export", headers=_auth(ADMIN_KEY))
    assert exported.status_code == 200 and len(exported.text.splitlines()) == 1
    assert httpx.get(f"{api}/export", headers=_auth(LABELER_KEY)).status_code == 401
    assert "Which response is better?" in httpx.get(url).text


# A valid body for every route that changes state; the test below fails when a new one is missing here.
MUTATING_BODIES = {("/", "post"): {"item_id": "pair-0", "choice": "tie", "idempotency_key": "unauthorised-1"},
                   ("/items", "post"): {"items": [{**ITEMS[0], "id": "pair-unauthorised"}]}}


def test_every_mutating_route_needs_a_key_and_text_must_be_unicode(service):
    url, _ = service
    api = url.rstrip("/")
    document = httpx.get(f"{api}/openapi.json").json()
    mutating = {(path, method) for path, operations in document["paths"].items() for method in operations
                if method in ("post", "put", "patch", "delete")}
    assert mutating == set(MUTATING_BODIES)
    before = httpx.get(f"{api}/stats", headers=_auth(ADMIN_KEY)).json()
    for (path, method), body in MUTATING_BODIES.items():
        for headers in ({}, _auth("wrong-key-0")):
            response = httpx.request(method.upper(), api + path.rstrip("/"), json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    surrogate = b'{"items": [{"id": "pair-x", "prompt": "\\ud800?", "a": "x", "b": "y"}]}'
    response = httpx.post(f"{api}/items", content=surrogate, headers={**_auth(ADMIN_KEY),
                                                                      "content-type": "application/json"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]
    assert httpx.get(f"{api}/stats", headers=_auth(ADMIN_KEY)).json() == before


def test_page_in_headless_chromium_across_a_restart(service):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from trustray.serve_apps.labeling import run_app

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if driver_path is None or browser is None:
        pytest.fail("chromium and chromium-driver are needed: run scripts/setup.sh (it installs them)")
    url, config = service
    store = LabelStore(config.db)
    for shown in iter(lambda: store.next_item("bob"), None):  # what other tests left unlabelled
        store.submit(shown.item_id, "bob", "skip", f"drain-{shown.item_id}")
    store.add_items([{**item, "id": f"web-{item['id']}"} for item in ITEMS[:2]])
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(url)
        driver.find_element(By.ID, "key").send_keys(LABELER_KEY)
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.ID, "prompt").text.endswith("Question 0?"))
        first_shown = driver.find_element(By.ID, "first").text
        driver.find_element(By.TAG_NAME, "body").send_keys("1")  # keyboard shortcut: the first response wins
        wait.until(lambda d: d.find_element(By.ID, "prompt").text.endswith("Question 1?"))
        run_app(config)  # redeploy: a new replica opens the same database
        driver.find_element(By.ID, "choose-tie").click()
        wait.until(lambda d: "Nothing to label" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()
    labels = LabelStore(config.db).labels()
    assert labels["web-pair-1"] == "tie"
    assert labels["web-pair-0"] == ("a" if first_shown == "answer a0" else "b")
