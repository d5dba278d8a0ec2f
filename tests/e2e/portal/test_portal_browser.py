"""The portal in a real headless Chromium (Debian's, driven by Playwright): a controller process, real host
daemons on loopback with the attestation service, and the pages a VM owner, an operator and a reader use.

One browser for the module; every wait is on page state (Playwright's ``expect``), bounded.  Screenshots of
each page go to ``build/portal-screenshots/``.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy.orm import Session

from cvmotion.control.auth import Role, issue_token
from cvmotion.control.db import database_url, open_database
from cvmotion.host.fabric import LocalFabric
from cvmotion.testing.controller import ControllerProcess

pytestmark = pytest.mark.timeout(600)

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[3] / "build" / "portal-screenshots"
BOOT_MS = 180_000  # a VM's create: launch, measured boot, first attestation (on a busy 2-core machine)
MOVE_MS = 180_000

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"Chromium is not installed at {CHROMIUM} (.ci/run installs Debian's chromium)", allow_module_level=True
    )


@dataclass
class Fleet:
    ctl: ControllerProcess
    fabric: LocalFabric

    def token(self, role: str) -> str:
        """A new API token, written into the controller's database as 'cvmotion controller token create' does."""
        engine = open_database(database_url(None, self.ctl.data_dir))
        try:
            with Session(engine) as session, session.begin():
                return issue_token(session, Role(role))
        finally:
            engine.dispose()

    def chip(self, host: str) -> str:
        return str(self.fabric.hosts[host].info["chip_id"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("portal")
    ctl = ControllerProcess(root / "ctl", heartbeat_timeout=10.0)
    ctl.start()
    fabric = LocalFabric(root / "fabric")
    f = Fleet(ctl, fabric)
    try:
        fabric.start_services()
        extra = ["--controller", ctl.url, "--controller-token", f.token("Host"), "--no-standby"]
        with ThreadPoolExecutor(2) as starting:  # the two hosts start side by side
            list(starting.map(lambda name: fabric.start_host(name, pool="pool-a", extra=extra), ("ha", "hb")))
        yield f
    finally:
        fabric.close()
        ctl.kill()


@pytest.fixture(scope="module")
def page(fleet: Fleet) -> Iterator[Page]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="portal-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
            viewport={"width": 1360, "height": 900},
        )  # fmt: skip
        context.set_default_timeout(30_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


_UNLABELLED = """() => Array.from(document.querySelectorAll("input:not([type=hidden]), select, textarea, button"))
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute("aria-label") && !(e.innerText || "").trim())
    .map(e => e.outerHTML.slice(0, 120))"""


def _shot(page: Page, name: str) -> None:
    """A screenshot of the page, after checking that every control on it has a label and the page a title."""
    assert page.evaluate(_UNLABELLED) == [], f"{name}: controls without a label"
    assert page.title().endswith("— cvmotion portal")
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, fleet: Fleet, token: str) -> None:
    page.context.clear_cookies()
    page.goto(fleet.ctl.url + "/")
    expect(page).to_have_title("Sign in — cvmotion portal")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_title("Virtual machines — cvmotion portal")


def _fill_basics(page: Page, rg: str, name: str) -> None:
    page.get_by_label("Resource group").fill(rg)
    page.get_by_label("Virtual machine name").fill(name)
    page.get_by_label("Size").select_option("Standard_DC2as_v5")
    page.get_by_label("Image").fill("kvstore")


def test_owner_creates_moves_and_attests(page: Page, fleet: Fleet) -> None:
    page.goto(fleet.ctl.url + "/portal/signin")
    _shot(page, "01-signin")
    _sign_in(page, fleet, fleet.ctl.owner_token)

    # Bad input: a clear message beside the field, nothing created.
    page.get_by_role("link", name="+ Create").click()
    expect(page).to_have_title("Create a virtual machine — cvmotion portal")
    page.get_by_label("Virtual machine name").fill("not a name!")
    page.get_by_role("button", name="Review + create").click()
    expect(page.locator("#name-error")).to_contain_text("letters, digits and hyphens")
    expect(page.locator("#resource_group-error")).to_contain_text("Enter a resource group")
    expect(page.get_by_label("Virtual machine name")).to_have_attribute("aria-invalid", "true")
    _shot(page, "02-create-bad-input")

    # The Create blade: Basics, then Management with the toggle (off by default), review, create.
    page.goto(fleet.ctl.url + "/portal/vms/new")
    _fill_basics(page, "web-rg", "web1")
    # Keyboard: the tabs follow the ARIA tabs pattern (arrow keys move and select).
    page.get_by_role("tab", name="Basics").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Management")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name="Management")).to_be_focused()
    expect(page.get_by_label("Virtual machine name")).to_be_hidden()
    page.keyboard.press("ArrowLeft")
    expect(page.get_by_label("Virtual machine name")).to_be_visible()
    page.get_by_role("tab", name="Management").click()
    toggle = page.get_by_role("switch", name="Enable confidential live migration")
    expect(toggle).not_to_be_checked()
    toggle.check()
    _shot(page, "03-create-management-tab")
    page.get_by_role("button", name="Review + create").click()
    expect(page.get_by_test_id("review-clm")).to_have_text("Enabled")
    _shot(page, "04-create-review")
    page.get_by_role("button", name="Create", exact=True).click()
    expect(page).to_have_title("web1 — virtual machine — cvmotion portal")
    expect(page.get_by_test_id("vm-power")).to_have_text("running", timeout=BOOT_MS)
    expect(page.get_by_test_id("vm-clm")).to_have_text("Enabled")
    expect(page.get_by_test_id("token-id")).not_to_be_empty(timeout=BOOT_MS)
    source = page.get_by_test_id("vm-host").inner_text()
    target = "hb" if source == "ha" else "ha"
    expect(page.get_by_test_id("token-chip")).to_have_attribute("title", fleet.chip(source))
    first_token = page.get_by_test_id("token-id").inner_text()
    page.goto(fleet.ctl.url + "/portal/vms")
    row = page.locator("tr[data-vm='web1']")
    expect(row.locator("[data-col='clm']")).to_have_text("Enabled")
    expect(row.locator("[data-col='power']")).to_contain_text("running")
    _shot(page, "05-vms")

    # A policy assignment denies opt-in in one resource group (made through the Policy page).
    page.get_by_role("link", name="Policy").click()
    page.get_by_label("Policy definition").select_option("deny-confidential-live-migration")
    page.get_by_label("Assignment name").fill("no-clm")
    page.get_by_label("Resource group (empty: the whole subscription)").fill("locked-rg")
    page.get_by_role("button", name="Assign").click()
    expect(page.locator("tr[data-assignment='no-clm']")).to_be_visible()
    _shot(page, "06-policy")
    page.goto(fleet.ctl.url + "/portal/vms/new")
    _fill_basics(page, "locked-rg", "web2")
    page.get_by_role("tab", name="Management").click()
    page.get_by_role("switch", name="Enable confidential live migration").check()
    page.get_by_role("button", name="Review + create").click()
    page.get_by_role("button", name="Create", exact=True).click()
    refusal = page.get_by_test_id("refusal")
    expect(refusal).to_contain_text("RequestDisallowedByPolicy")
    expect(page.get_by_test_id("assignment")).to_have_text("no-clm")
    _shot(page, "07-create-refused-by-policy")

    # The VM moves while the host page is open: it updates without a reload.
    page.goto(f"{fleet.ctl.url}/portal/hosts/{source}")
    page.evaluate("window.__notReloaded = true")
    has_drains = _move(page, fleet, source)
    vm_row = page.locator("[data-testid='host-vms'] tr[data-vm='web1']")
    expect(vm_row.locator("[data-col='host']")).to_have_text(target, timeout=MOVE_MS)
    expect(vm_row.locator("[data-col='move-status']")).to_have_text("Succeeded", timeout=MOVE_MS)
    assert page.evaluate("window.__notReloaded") is True
    if has_drains:
        ladder = page.locator("tr[data-drain-vm='web1']")
        expect(ladder.locator("[data-col='outcome']")).to_have_text("Succeeded", timeout=MOVE_MS)
        expect(page.locator("[data-col='drain-status']")).to_have_text("Succeeded", timeout=MOVE_MS)
    _shot(page, "09-host-after-move")
    if has_drains:  # the drained host stays cordoned until an operator uncordons it
        page.reload()
        expect(page.get_by_test_id("host-state")).to_have_text("Cordoned")
        page.get_by_role("button", name="Uncordon").click()
        expect(page.get_by_test_id("host-state")).to_have_text("Available")

    # The VM page: the new token, signed on the destination's chip; the move in the history.
    page.goto(fleet.ctl.url + "/portal/vms/default/web-rg/web1")
    expect(page.get_by_test_id("token-chip")).to_have_attribute("title", fleet.chip(target), timeout=MOVE_MS)
    expect(page.get_by_test_id("token-id")).not_to_have_text(first_token)
    expect(page.get_by_test_id("token-platform")).to_have_text("emulated")
    expect(page.get_by_test_id("moves")).to_contain_text(f"{source} → {target}")
    _shot(page, "10-vm-attestation")

    # Events: the history, and a new event arriving live (Server-Sent Events) without a reload.
    page.goto(fleet.ctl.url + "/portal/events")
    timeline = page.get_by_test_id("timeline")
    expect(timeline).to_contain_text("VmMigrated")
    page.evaluate("window.__notReloaded = true")
    before = timeline.locator("li").count()
    patch = {"properties": {"securityProfile": {"confidentialLiveMigration": "Disabled"}}}
    vm_path = "/subscriptions/default/resourceGroups/web-rg/providers/Microsoft.Compute/virtualMachines/web1"
    assert fleet.ctl.api("PATCH", vm_path, patch).status_code == 200
    expect(timeline.locator("li").first).to_contain_text("VmConfidentialLiveMigrationChanged")
    assert timeline.locator("li").count() > before
    assert page.evaluate("window.__notReloaded") is True
    _shot(page, "11-events")
    page.goto(fleet.ctl.url + "/portal/charts")
    # Three charts; a move the worker settled by finding the VM already arrived carries no timings to draw.
    expect(page.get_by_role("figure")).to_have_count(3)
    _shot(page, "12-charts")
    page.goto(fleet.ctl.url + "/portal/hosts")
    expect(page.locator("tr[data-host='ha'] [data-col='state']")).to_have_text("Available")
    _shot(page, "13-hosts")

    # The opt-in toggle on the VM page (keyboard: Space toggles the switch, Enter submits).
    page.goto(fleet.ctl.url + "/portal/vms/default/web-rg/web1")
    page.get_by_role("switch", name="Enable confidential live migration").focus()
    page.keyboard.press("Space")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_test_id("vm-clm")).to_have_text("Enabled")


def _move(page: Page, fleet: Fleet, source: str) -> bool:
    """Drain the VM's host through the page when the controller has drains; else the operator's migrate."""
    has_drains = httpx.get(
        f"{fleet.ctl.url}/providers/Cvmotion.Fabric/hosts/{source}/drain",
        headers={"Authorization": f"Bearer {fleet.ctl.owner_token}"},
        timeout=30,
    ).status_code != 404 or "/drain" in json.dumps(
        httpx.get(fleet.ctl.url + "/openapi.json", timeout=30).json()["paths"]
    )
    if has_drains:
        page.get_by_label("Reason").select_option("SecurityUpdate")
        page.get_by_label("Notice before each move").fill("soon")
        page.get_by_role("button", name=f"Drain {source}").click()
        expect(page.locator("#notice-error")).to_contain_text("Enter a number of seconds")
        expect(page.get_by_test_id("host-state")).to_have_text("Available")  # nothing was drained
        page.get_by_label("Reason").select_option("SecurityUpdate")
        page.get_by_label("Notice before each move").fill("0")  # the VM's Scheduled Event is due at once
        page.get_by_role("button", name=f"Drain {source}").click()
        expect(page.get_by_test_id("drain-status")).to_be_visible()
        expect(page.get_by_test_id("host-state")).to_have_text(re.compile("Draining|Cordoned"))
        page.evaluate("window.__notReloaded = true")
        ladder = page.locator("tr[data-drain-vm='web1']")
        expect(ladder.locator("[data-col='method']")).to_have_text("LiveMigration", timeout=MOVE_MS)
    else:
        # No drain API on this controller: the same move through the VM's operator action, in a second tab,
        # while this page stays open.
        other = page.context.new_page()
        other.goto(fleet.ctl.url + "/portal/vms/default/web-rg/web1")
        other.get_by_role("button", name="Live-migrate now").click()
        expect(other.get_by_test_id("vm-provisioning")).to_have_text("Migrating", timeout=30_000)
        other.close()
    in_flight = page.locator("[data-testid='host-vms'] tr[data-vm='web1'] [data-col='move-status']")
    # The move may finish between two refreshes on a quick machine: in flight or done, never a reload.
    expect(in_flight).to_have_text(re.compile("InProgress|Succeeded"), timeout=MOVE_MS)
    _shot(page, "08-host-drain-in-progress")
    return has_drains


def test_reader_sees_no_buttons(page: Page, fleet: Fleet) -> None:
    _sign_in(page, fleet, fleet.token("Reader"))
    expect(page.get_by_test_id("role")).to_contain_text("Reader")
    expect(page.locator("tr[data-vm='web1']")).to_be_visible()
    expect(page.get_by_role("link", name="+ Create")).to_have_count(0)
    page.goto(fleet.ctl.url + "/portal/vms/default/web-rg/web1")
    expect(page.get_by_test_id("vm-clm")).to_be_visible()
    for name in ("Live-migrate now", "Delete", "Save"):
        expect(page.get_by_role("button", name=name)).to_have_count(0)
    page.goto(fleet.ctl.url + "/portal/hosts/ha")
    expect(page.get_by_role("button", name="Drain ha")).to_have_count(0)
    page.goto(fleet.ctl.url + "/portal/policy")
    expect(page.get_by_role("button", name="Assign")).to_have_count(0)
    _shot(page, "14-reader-vm-list")
    # The page a Reader cannot reach by a button, forged: the API refuses it.
    page.goto(fleet.ctl.url + "/portal/vms/new")
    _fill_basics(page, "web-rg", "forged")
    page.get_by_role("button", name="Review + create").click()
    page.get_by_role("button", name="Create", exact=True).click()
    expect(page.get_by_test_id("refusal")).to_contain_text("AuthorizationFailed")
    vm = "/subscriptions/default/resourceGroups/web-rg/providers/Microsoft.Compute/virtualMachines/forged"
    assert fleet.ctl.api("GET", vm).status_code == 404
