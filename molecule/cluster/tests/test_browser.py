"""Headless Chromium loads the page over HTTPS through the VIP, trusting the cluster's CA the way a
user's browser does (the CA in the profile's NSS database, nothing else relaxed), and predicts with
an API key typed into the page. A profile without the CA gets the certificate error instead.
"""

import os
import re
import subprocess

import pytest
from test_cluster import VIP, _host, _key

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="chromium/chromium-driver not installed (scripts/bootstrap --test installs them)",
)


def _browser(home, trust_ca):
    """Chromium with its own HOME: on Linux it trusts the CAs of $HOME/.pki/nssdb."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
    if trust_ca:
        ca = home / "ca.pem"
        ca.write_text(_host("cl-broker").file("/etc/modelserve/pki/modelserve-ca.pem").content_string)
        # -t C,,: a CA trusted to issue server certificates.
        add = ["certutil", "-A", "-d", f"sql:{nssdb}", "-t", "C,,", "-i", str(ca), "-n", "modelserve CA"]
        subprocess.run(add, check=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={home / 'profile'}", "--window-size=1200,900",
    ):  # fmt: skip
        options.add_argument(arg)
    service = Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    return driver


def test_chromium_trusting_the_cluster_ca_predicts_through_the_vip(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    key = _key("load")
    browser = _browser(tmp_path, trust_ca=True)
    try:
        browser.get(f"https://{VIP}/")
        wait = WebDriverWait(browser, 30)
        # Served model section: filled from the fleet (the front end asked the workers).
        wait.until(lambda d: re.fullmatch(r"\d+\.\d+\.\d+", d.find_element(By.ID, "served-version").text))
        browser.find_element(By.NAME, "api_key").send_keys(key)
        row = {"pregnancies": "6", "glucose": "168", "blood_pressure": "72", "skin_thickness": "35",
               "insulin": "0", "bmi": "38.6", "diabetes_pedigree": "0.9", "age": "50"}  # fmt: skip
        for name, value in row.items():
            field = browser.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        browser.find_element(By.ID, "submit").click()
        wait.until(ec.presence_of_element_located((By.ID, "probability")))
        assert 0 < float(browser.find_element(By.ID, "probability").text.rstrip("%")) <= 100
        assert browser.execute_script("return window.isSecureContext") is True
    finally:
        browser.quit()


def test_chromium_without_the_ca_refuses_the_certificate(tmp_path):
    browser = _browser(tmp_path, trust_ca=False)
    try:
        browser.get(f"https://{VIP}/")
        # Chromium's interstitial, not the page: the certificate is only good with the CA trusted.
        assert "served-version" not in browser.page_source
        assert "ERR_CERT_AUTHORITY_INVALID" in browser.page_source, browser.title
    finally:
        browser.quit()
