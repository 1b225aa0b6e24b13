"""The audit report as its readers see it: report.html opened in headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs), every figure loaded and shown at its own size (readable at 100% zoom)."""

import shutil
from pathlib import Path

import pytest
import torch

from robustattr.audit import run_audit
from robustattr.models import SmallCNN
from tests.helpers.zoo import every_audit_section

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian's chromium and chromium-driver are not installed"),
]


def _audit(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    paths = []
    for name in ("base", "other"):
        torch.save(SmallCNN(width=4).state_dict(), tmp_path / f"{name}.pt")
        paths.append(f"{name}={tmp_path / name}.pt")
    sections = every_audit_section(num_samples=12, epsilons=[2 / 255, 8 / 255, 0.1])
    run_audit(paths, sections, out=str(tmp_path / "audit"), num_samples=12, batch_size=6,
              net={"class_path": "robustattr.models.SmallCNN", "init_args": {"width": 4}},
              data={"class_path": "robustattr.data.DigitsDataModule"})  # fmt: skip
    return tmp_path / "audit" / "report.html"


def chromium(tmp_path: Path):
    """Headless Chromium through its driver, offline, 1280 pixels wide, with a throw-away profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def test_every_figure_loads_and_shows_at_its_own_size_in_chromium(tmp_path):
    page = _audit(tmp_path)
    driver = chromium(tmp_path)
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.width])"
        )
        text = driver.execute_script("return document.body.innerText")
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert len(images) >= 12, images  # the trade-off, each section's figures, example maps for both checkpoints
    for alt, complete, natural, shown in images:
        assert complete and natural > 0, alt  # loaded
        assert shown == natural, (alt, natural, shown)  # not scaled down: the fonts stay at their size
    assert sum("example maps" in alt for alt, *_ in images) == 2
    assert "label purity" in text and "PGD accuracy at" in text and "equally coherent" not in text
    assert (tmp_path / "report.png").stat().st_size > 10_000
