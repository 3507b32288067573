"""JupyterLab of a hub user server in remote mode, in a real browser (Debian's headless
Chromium through Selenium): logged in through the hub's login form, alice's Crucible panel
lists her executions and none of bob's; carol's, whose crucible service is down, says the
service is unreachable (panel and status bar); the service's own API URL opened in the
browser goes through the hub's OAuth and back, and lists alice's executions only."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.hub import Hub, UserServer, user_server
from tests.helpers.lab import CHROMEDRIVER, CHROMIUM, CHROMIUM_ARGS, INSTALL_HINT
from tests.helpers.net import wait_until

pytestmark = [pytest.mark.hub, pytest.mark.browser]

GUARD = 180  # seconds a page may take to show something (a guard for a loaded machine)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Headless Debian Chromium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            pytest.fail(f"{path} not found: {INSTALL_HINT}", pytrace=False)
    profile = tempfile.mkdtemp(prefix="crucible-hub-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    options.unhandled_prompt_behavior = "accept"
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def goto(driver: Any, url: str) -> None:
    """Open ``url``; again when Chromium aborted the load with ERR_NETWORK_CHANGED (it does
    when any network interface of the machine comes or goes, as other tests' sandboxes and
    cluster pods make them), which says nothing about the page."""
    for _ in range(5):
        driver.get(url)
        if "ERR_NETWORK_CHANGED" not in driver.find_element("tag name", "body").text:
            return
    raise AssertionError(f"Chromium kept failing to load {url}: ERR_NETWORK_CHANGED")


def log_in(driver: Any, hub: Hub, user: str) -> None:
    """Log in to the hub as ``user`` through its login form (after logging out anyone)."""
    goto(driver, f"{hub.url}/hub/logout")
    driver.delete_all_cookies()
    goto(driver, f"{hub.url}/hub/login")
    wait_until(lambda: driver.find_elements("id", "username_input"), GUARD, "the login form")
    driver.find_element("id", "username_input").send_keys(user)
    driver.find_element("id", "password_input").send_keys("any")
    driver.find_element("id", "login_submit").click()
    wait_until(lambda: "/hub/login" not in driver.current_url, GUARD, "the hub to accept the login")


def open_panel(driver: Any, hub: Hub, server: UserServer) -> None:
    """Log in to the hub as the server's user, open their JupyterLab and the Crucible panel."""
    log_in(driver, hub, server.user)
    goto(driver, f"{server.base}lab/workspaces/{uuid.uuid4().hex[:12]}")
    tab = wait_until(
        lambda: driver.find_elements(
            "css selector", '.jp-SideBar .lm-TabBar-tab[data-id="crucible-history"]'
        ),
        GUARD,
        f"the Crucible tab in {server.user}'s JupyterLab (at {driver.current_url})",
    )
    tab[0].click()
    wait_until(
        lambda: driver.execute_script(
            "const p = document.getElementById('crucible-history');"
            "return p && !p.classList.contains('lm-mod-hidden')"
            " && !!p.querySelector('.jp-CrucibleHistory-header');"
        ),
        GUARD,
        "the Crucible panel to show",
    )


def shown_ids(driver: Any) -> set[str]:
    return set(
        driver.execute_script(
            "return [...document.querySelectorAll('#crucible-history"
            " .jp-CrucibleHistory-row')].map(r => r.dataset.executionId);"
        )
    )


def test_alices_panel_lists_hers_only(hub: Hub, chromium: Any) -> None:
    alices = hub.call("alice", "POST", "executions", json={"code": "print('for the panel')"})[1]
    bobs = hub.call("bob", "POST", "executions", json={"code": "print('not for alice')"})[1]
    with user_server(hub, "alice") as server:
        open_panel(chromium, hub, server)
        wait_until(lambda: alices["id"] in shown_ids(chromium), GUARD, "alice's row")
        code, page, _ = server.call("GET", "executions", params={"limit": 50})
        assert code == 200, page
        mine = {e["id"] for e in page["executions"]}
        assert all(e["user"] == "alice" for e in page["executions"]), page
        shown = shown_ids(chromium)
        assert bobs["id"] not in shown
        assert shown <= mine, shown - mine


def test_carols_panel_says_her_service_is_unreachable(hub: Hub, chromium: Any) -> None:
    with user_server(hub, "carol") as server:
        open_panel(chromium, hub, server)
        alert = wait_until(
            lambda: chromium.find_elements(
                "css selector", "#crucible-history .jp-CrucibleHistory-error"
            ),
            GUARD,
            "the panel's error",
        )
        text = alert[0].text
        assert f"http://127.0.0.1:{hub.spare_port}/services/crucible/ is unreachable" in text
        assert "ask your JupyterHub administrator" in text
        # the status bar says so too, the reason in its tooltip
        item = wait_until(
            lambda: [
                e
                for e in chromium.find_elements("css selector", ".jp-CrucibleQueueStatus")
                if e.text == "crucible: unavailable"
            ],
            GUARD,
            "the status bar's 'crucible: unavailable'",
        )
        assert "is unreachable" in item[0].get_attribute("title")


def test_the_service_in_a_browser_logs_in_through_the_hub(hub: Hub, chromium: Any) -> None:
    alices = hub.call("alice", "POST", "executions", json={"code": "print('a')"})[1]
    bobs = hub.call("bob", "POST", "executions", json={"code": "print('b')"})[1]
    with user_server(hub, "alice"):  # logging in starts her server: it is stopped afterwards
        log_in(chromium, hub, "alice")
        url = f"{hub.service_url}api/executions?limit=500"
        goto(chromium, url)  # to the hub's OAuth and back, as a browser goes
        wait_until(lambda: chromium.current_url == url, GUARD, "the way back from the hub")
        text = wait_until(
            lambda: chromium.find_element("tag name", "body").text, GUARD, "the answer"
        )
        listed = {e["id"] for e in json.loads(text)["executions"]}
        assert alices["id"] in listed
        assert bobs["id"] not in listed
