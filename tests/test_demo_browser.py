"""The demo page in a real headless browser (Debian's chromium driven by selenium through chromium-driver).

Loads the page, types a query, asks for GI-ITM reranking, clicks Search, waits for both galleries and checks that
they show the images the library ranks first, in its order; saves a screenshot (to $ENTITYCLIP_DEMO_SCREENSHOT
too, when set: that is how docs/demo_page.png was made). Skipped, with the reason, where no browser is installed:
`apt-get install -y chromium chromium-driver`. Nothing is downloaded (selenium's driver manager is kept offline).
"""

import os
import shutil

import pytest

from .demo_helpers import make_split, save_tiny_model, served

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="the browser test needs selenium (pip install -e '.[dev]')"
)
pytest.importorskip("gradio", reason="the demo tests need gradio (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from entityclip_hf.evaluation import load_model_and_processor, load_split  # noqa: E402
from entityclip_hf.retrieval import EmbeddingIndex, encode_images, encode_texts, rerank_with_itm  # noqa: E402

BROWSER = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason=f"no headless browser here (chromium: {BROWSER}, chromedriver: {DRIVER}): "
    "apt-get install -y chromium chromium-driver",
)


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1500", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def gallery_ids(driver, element_id):
    labels = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} .caption-label")
    return [label.text.split(" · ")[1] for label in labels if " · " in label.text]


def test_search_in_a_real_browser_shows_the_expected_images(browser, tmp_path, tiny_clip_config, tiny_processor):
    model_folder = save_tiny_model(tmp_path / "best", tiny_clip_config, tiny_processor)
    root = make_split(tmp_path / "data")
    model, processor = load_model_and_processor(model_folder)
    split, _ = load_split("jsonl", root, "test")
    query, k = split["text"][2], 8
    index = EmbeddingIndex(encode_images(model, processor, split, progress=False), split["id"])
    hits = index.search(encode_texts(model, processor, [query], progress=False), k=k)
    candidates = [split[row]["image"] for row in hits.indices[0].tolist()]
    reranked = [c.id for c in rerank_with_itm(model, processor, query, candidates, candidate_ids=hits.ids[0])]

    argv = ["--model", str(model_folder), "--dataset", "jsonl", "--root", str(root), "--split", "test"]
    with served(argv) as (url, _):
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "ready" in d.find_element(By.ID, "gallery-status").text)
        browser.find_element(By.CSS_SELECTOR, "#query textarea").send_keys(query)
        k_box = browser.find_element(By.CSS_SELECTOR, "#k-images input")
        k_box.clear()
        k_box.send_keys(str(k))
        browser.find_element(By.CSS_SELECTOR, "#rerank-images input[type=checkbox]").click()
        browser.find_element(By.ID, "search-images").click()
        wait.until(lambda d: len(gallery_ids(d, "clip-gallery")) == k and len(gallery_ids(d, "rerank-gallery")) == k)
        wait.until(lambda d: all(img.get_attribute("complete") == "true" and int(img.get_attribute("naturalWidth")) > 0
                                 for img in d.find_elements(By.CSS_SELECTOR, "#clip-gallery img")))  # fmt: skip
        shown, shown_reranked = gallery_ids(browser, "clip-gallery"), gallery_ids(browser, "rerank-gallery")
        message = browser.find_element(By.ID, "image-search-message").text
        screenshot = tmp_path / "demo_page.png"
        browser.save_screenshot(str(screenshot))

        # Clicking a result picks it as the query of the image -> texts tab, which opens.
        browser.find_elements(By.CSS_SELECTOR, "#clip-gallery .thumbnail-item")[0].click()
        wait.until(lambda d: [box.get_attribute("value") for box in d.find_elements(By.CSS_SELECTOR, "#gallery-id textarea")]
                   == [hits.ids[0][0]])  # fmt: skip
        browser.find_element(By.ID, "search-texts").click()
        wait.until(lambda d: all(item_id in d.find_element(By.ID, "clip-texts").text for item_id in split["id"]))
        captions_table = browser.find_element(By.ID, "clip-texts").text
    assert shown == hits.ids[0]
    assert shown_reranked == reranked
    assert "its own image is marked ✔ ground truth" in message
    assert screenshot.stat().st_size > 10_000
    own_id = hits.ids[0][0]
    own_caption = split["text"][split["id"].index(own_id)]
    # The picked image's own caption is the one marked (cells read row by row: id, cosine, mark, caption).
    assert captions_table.count("✔") == 1
    assert captions_table.index(own_id) < captions_table.index("✔") < captions_table.index(own_caption)
    if os.environ.get("ENTITYCLIP_DEMO_SCREENSHOT"):
        from PIL import Image

        # A palette PNG keeps the page readable at a fraction of the size (for docs/, under 200 KB).
        with Image.open(screenshot) as image:
            image.convert("RGB").quantize(colors=128).save(os.environ["ENTITYCLIP_DEMO_SCREENSHOT"], optimize=True)
