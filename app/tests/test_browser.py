"""The human page in real headless Chromium (selenium), against the live stack."""

from __future__ import annotations

import os
import shutil

import pytest
import requests
from ms_support import requires_rabbitmq

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    requires_rabbitmq,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="chromium/chromium-driver not installed (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900",
    ):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations show there
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_form_predicts_and_chart_updates(live_stack, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(live_stack.url + "/")
    wait.until(ec.text_to_be_present_in_element((By.ID, "served-version"), "1.0.0"))
    assert browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar") == []

    def fill(values: dict[str, str]) -> None:
        for name, value in values.items():
            field = browser.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)

    fill({"pregnancies": "6", "glucose": "168", "blood_pressure": "72", "skin_thickness": "35",
          "insulin": "0", "bmi": "38.6", "diabetes_pedigree": "0.9", "age": "50"})  # fmt: skip
    browser.find_element(By.ID, "submit").click()
    wait.until(ec.presence_of_element_located((By.ID, "probability")))
    text = browser.find_element(By.ID, "result").text
    assert "Probability of diabetes:" in text and "%" in text, text
    assert browser.find_element(By.ID, "model-version").text == "1.0.0"
    high = float(browser.find_element(By.ID, "probability").text.rstrip("%"))
    assert 50 < high <= 100
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar")
    assert len(bars) == 1
    assert float(bars[0].get_attribute("data-probability")) == pytest.approx(high / 100, abs=0.001)

    fill({"glucose": "85", "bmi": "22", "age": "25", "diabetes_pedigree": "0.2", "pregnancies": "0"})
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart rect.bar")) == 2)
    low = float(browser.find_element(By.ID, "probability").text.rstrip("%"))
    assert low < high
    assert browser.find_element(By.ID, "count").text == "2"

    # an invalid value is reported by the API with the field name, not a crash
    fill({"glucose": "-5"})
    browser.find_element(By.ID, "submit").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "result"), "row.glucose"))
    assert "Error 422" in browser.find_element(By.ID, "result").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect.bar")) == 2
    browser.save_screenshot(str(tmp_path / "page.png"))

    # Under the Content-Security-Policy: the stylesheet applied, nothing was refused.
    assert (
        "default-src 'none'"
        in requests.get(live_stack.url + "/", timeout=10).headers["Content-Security-Policy"]
    )
    button = browser.find_element(By.ID, "submit")
    assert button.value_of_css_property("background-color") in ("rgba(31, 111, 235, 1)", "rgb(31, 111, 235)")
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused, refused


def drift_table(driver) -> dict:
    """The drift table read in one script, so a poll that re-renders the rows between two reads
    cannot hand the test a stale element: {column: {class, psi, meter}}."""
    return driver.execute_script(
        """
        const out = {};
        for (const tr of document.querySelectorAll("#drift-rows tr[id^='drift-']")) {
          const psi = tr.querySelector("td.psi"), meter = tr.querySelector("meter");
          out[tr.id.slice(6)] = {class: tr.className, psi: psi && psi.textContent,
                                 meter: meter && meter.value};
        }
        return out;
        """
    )


def test_page_shows_version_age_throughput_and_drift_and_follows_them(make_stack, browser, seed_release):
    """The status section, from /api/v1/model: filled in, then updated without a reload when the
    traffic drifts (the page polls; the window's statistics come from the worker's status)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from test_drift import heldout_rows

    stack = make_stack(workers=1, MODELSERVE_DRIFT_MIN_ROWS="100")
    stack.wait_ready()
    rows = heldout_rows(seed_release)
    for chunk in range(0, len(rows), 50):
        r = requests.post(
            f"{stack.url}/api/v1/predict", json={"rows": rows[chunk : chunk + 50].tolist()}, timeout=15
        )
        assert r.status_code == 200

    wait = WebDriverWait(browser, 30)
    browser.get(stack.url + "/")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status-version"), "1.0.0"))
    # The seed release was trained on 2026-11-25: days ago, said in words.
    assert browser.find_element(By.ID, "status-age").text.endswith("days ago")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#drift-rows tr")) == 9)
    assert "live rows in the window" in browser.find_element(By.ID, "drift-state").text
    model = requests.get(f"{stack.url}/api/v1/model", timeout=10).json()
    table = drift_table(browser)
    for column in ("glucose", "score"):
        assert table[column]["class"] in ("stable", "moderate")
        psi = float(table[column]["psi"])
        assert psi == pytest.approx(model["drift"]["columns"][column]["psi"], abs=0.002)
        assert float(table[column]["meter"]) == pytest.approx(psi, abs=0.002)
    # Throughput: the worker's rows per second, once it has two samples of its count.
    wait.until(lambda d: "predictions/s" in d.find_element(By.ID, "status-throughput").text)

    # Drifted traffic: the page shows it without a reload.
    shifted = rows.copy()
    shifted[:, 2] += 15
    for _ in range(7):
        for chunk in range(0, len(shifted), 50):
            r = requests.post(
                f"{stack.url}/api/v1/predict", json={"rows": shifted[chunk : chunk + 50].tolist()}, timeout=15
            )
            assert r.status_code == 200
    table = wait.until(
        lambda d: (t := drift_table(d)).get("blood_pressure", {}).get("class") == "significant" and t
    )
    assert float(table["blood_pressure"]["psi"]) > 0.25
    assert table["glucose"]["class"] != "significant"
    browser.save_screenshot(str(stack.base / "status.png"))
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused, refused


def test_the_api_key_field_sends_the_key_and_keeps_it_for_the_tab(live_stack, browser):
    """Behind the front door a prediction needs X-API-Key: the page sends what the user typed (the
    proxy checks it; gunicorn here ignores it), keeps it for the tab across a reload, and sends
    no header when the field is empty."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    spy = """
      window.__sent = [];
      const real = window.fetch;
      window.fetch = function (url, init) {
        if (String(url).indexOf('/api/v1/predict') >= 0) { window.__sent.push((init || {}).headers || {}); }
        return real.apply(this, arguments);
      };
    """
    browser.get(live_stack.url + "/")
    wait.until(ec.text_to_be_present_in_element((By.ID, "served-version"), "1.0.0"))
    browser.execute_script(spy)
    key = browser.find_element(By.NAME, "api_key")
    assert key.get_attribute("type") == "password"
    key.send_keys("k3y-for-this-tab")
    browser.find_element(By.ID, "submit").click()
    wait.until(ec.presence_of_element_located((By.ID, "probability")))
    assert browser.execute_script("return window.__sent")[-1].get("X-API-Key") == "k3y-for-this-tab"

    browser.refresh()
    wait.until(ec.text_to_be_present_in_element((By.ID, "served-version"), "1.0.0"))
    browser.execute_script(spy)
    assert browser.find_element(By.NAME, "api_key").get_attribute("value") == "k3y-for-this-tab"
    browser.find_element(By.NAME, "api_key").clear()
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.execute_script("return window.__sent.length") == 1)
    assert "X-API-Key" not in browser.execute_script("return window.__sent")[0]
    assert browser.execute_script("return sessionStorage.getItem('modelserve-api-key')") is None
