"""The search page in a real browser: Debian's headless Chromium driven by Playwright uploads a
photo, chooses an attribute, clicks Search and reads the ranking the index gives; then picks a
catalog image instead."""
import os
import re
import shutil
import socket

import jax
import pytest

from asen_jax import checkpoint as ckpt_lib
from asen_jax import data as data_lib
from asen_jax import model as model_lib
from asen_jax.search import page as page_lib
from asen_jax.search import service
from tests import tiny_synthetic

CHROMIUM = "/usr/bin/chromium"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  data = tiny_synthetic.make_data(tmp_path_factory)
  config = tiny_synthetic.tiny_config(data, "joint")
  work = tmp_path_factory.mktemp("app")
  info = data_lib.dataset_info(config)
  model = model_lib.build_model(config.model, len(info.attributes), with_local=True)
  variables = model_lib.init_variables(model, jax.random.key(1), config.data.image_size,
                                       config.model.local_size)
  ckpt_lib.save_model_variables(str(work / "ckpt"), jax.device_get(variables), {
      "attributes": list(info.attributes), "stage": "joint", "model": config.model.to_dict()})
  service.build(config, str(work / "ckpt"), str(work / "index"), {"kind": "flat"},
                images=[os.path.join(data, "Synthetic", "images", "test")])
  searcher = service.Searcher(str(work / "index"))
  page = page_lib.make_page(searcher, top_k=5)
  port = _free_port()
  page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
              allowed_paths=page_lib.allowed_paths(searcher), quiet=True)
  yield searcher, f"http://127.0.0.1:{port}", work
  page.close()


def test_upload_choose_search_shows_the_indexes_ranking(served):
  if not os.path.exists(CHROMIUM):
    message = f"{CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium)."
    if os.environ.get("ASEN_REQUIRE_BROWSER"):
      pytest.fail(message)
    pytest.skip(message)
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  searcher, url, work = served
  photo = work / "my photo.jpg"   # an upload from outside the catalog
  shutil.copyfile(searcher.index.items[3], photo)
  want, _ = searcher.query(str(photo), "neckline", top_k=5)
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      # The first search compiles the model in the server: minutes on a loaded 2-core machine.
      page.set_default_timeout(180_000)
      page.goto(url, wait_until="domcontentloaded")
      page.locator("#query input[type=file]").set_input_files(str(photo))
      page.locator("#attribute input").click()
      page.get_by_role("option", name="neckline", exact=True).click()
      page.locator("#search").click()
      results = page.locator("#results")
      results.get_by_text(os.path.basename(want[-1]["path"])).wait_for(timeout=300_000)
      rows = re.findall(r"^\s*(\d+)\s+([-\d.]+)\s+(\S+)\s*$", results.inner_text(), re.M)
      assert "neckline" in results.inner_text()
      assert page.locator("#gallery img").count() == 5
      assert page.locator("#attention img").count() == 1
      # A catalog image picked instead: it finds itself first (flat, cosine 1).
      picked = searcher.index.items[7]
      page.locator("#pick input").fill(os.path.basename(picked))
      page.get_by_role("option", name=os.path.basename(picked), exact=True).click()
      page.locator("#search").click()
      page.locator("#results tr").nth(1).get_by_text(picked).wait_for(timeout=300_000)
      first = re.findall(r"^\s*1\s+([-\d.]+)\s+(\S+)\s*$", results.inner_text(), re.M)
    finally:
      browser.close()
  assert first == [("1.0000", picked)]
  assert [(int(r), p) for r, _, p in rows] == [(w["rank"], w["path"]) for w in want]
  for (_, score, _), w in zip(rows, want):
    assert float(score) == pytest.approx(w["score"], abs=1e-4)
