"""The search web page (Gradio): a photo or a catalog image, an attribute, then the attention map
with its RoI box and the top K with scores."""
import os

import gradio as gr
import numpy as np
from PIL import Image
from PIL import ImageDraw

from asen_jax import pointing
from asen_jax import viz

THUMB = 192   # gallery tiles: small, so that a page of 50 loads at once


def _thumbnail(path):
  with Image.open(path) as im:
    im = im.convert("RGB")
    im.thumbnail((THUMB, THUMB))
    return np.asarray(im)


def attention_picture(searcher, extras, size=320):
  """The query's view with its attention heatmap and the RoI box (yellow)."""
  overlay = viz.heatmap_overlay(extras["view"], extras["attmap"],
                                stride=pointing.attention_stride(searcher.embedder.config))
  im = Image.fromarray(overlay).resize((size, size), Image.Resampling.BILINEAR)
  x0, y0, x1, y1 = (np.asarray(extras["box"], np.float64) * size).tolist()
  ImageDraw.Draw(im).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)],
                               outline=viz.BOX_COLOUR, width=3)
  return np.asarray(im)


def _labels(paths):
  """Short unique names: the paths below their common folder."""
  if len(paths) < 2:
    return [os.path.basename(p) for p in paths]
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  return [os.path.relpath(p, root) for p in paths]


def results_markdown(results, attribute):
  rows = [f"**{attribute}**: top {len(results)}", "", "| rank | score | image |",
          "| ---: | ---: | --- |"]
  rows += [f"| {r['rank']} | {r['score']:.4f} | {r['path']} |" for r in results]
  return "\n".join(rows)


def make_page(searcher, top_k=10, catalog_choices=200):
  """A gr.Blocks page over a service.Searcher; `catalog_choices` catalog images to pick from."""
  attributes = searcher.attributes
  items = [p for _, p in searcher.index.live_items()][:catalog_choices]

  def run(image, attribute, k):
    if not image:
      raise gr.Error("Upload a photo or pick a catalog image first.")
    try:
      results, extras = searcher.query(image, attribute, int(k))
    except (ValueError, FileNotFoundError) as e:
      raise gr.Error(str(e)) from None
    gallery = [(_thumbnail(r["path"]), f"#{r['rank']}  {r['score']:.3f}") for r in results]
    return attention_picture(searcher, extras), gallery, results_markdown(results, attribute)

  with gr.Blocks(title="ASEN++ attribute search") as page:
    gr.Markdown(f"## ASEN++ attribute search\n{len(searcher.index.live_items())} catalog images,"
                f" {len(attributes)} attributes ({searcher.index.meta['spec']['kind']} index).")
    with gr.Row():
      with gr.Column(scale=1):
        query = gr.Image(type="filepath", label="Query photo", sources=["upload"],
                         elem_id="query")
        pick = gr.Dropdown(choices=list(zip(_labels(items), items)), value=None,
                           label="or a catalog image", elem_id="pick")
        attribute = gr.Dropdown(choices=attributes, value=attributes[0], label="Attribute",
                                elem_id="attribute")
        k = gr.Slider(1, 50, value=top_k, step=1, label="Top K", elem_id="top_k")
        button = gr.Button("Search", variant="primary", elem_id="search")
      with gr.Column(scale=2):
        attention = gr.Image(label="Attention map and RoI", elem_id="attention", height=320)
        gallery = gr.Gallery(label="Top K", columns=5, elem_id="gallery", height="auto")
        table = gr.Markdown(elem_id="results")
    pick.change(lambda p: p, pick, query)
    button.click(run, [query, attribute, k], [attention, gallery, table])
  return page


def allowed_paths(searcher):
  """Folders the page may serve catalog images from (the picked image is shown in the page)."""
  return sorted({os.path.dirname(p) for _, p in searcher.index.live_items()})
