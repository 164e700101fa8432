"""The search web page on 127.0.0.1: `python app.py --index runs/demo/index [--port 7860]`.

Upload a photo or pick a catalog image, choose an attribute, see where the model looks (attention
map and RoI box) and the top K catalog images with their scores. The index (search.py build)
names the checkpoint and config it was built with; they are loaded once.
"""
from asen_jax import allocator

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import os

from absl import flags
from absl import logging

from asen_jax import cli

_INDEX = flags.DEFINE_string("index", None, "Index folder written by search.py build.")
_PORT = flags.DEFINE_integer("port", 7860, "Port on 127.0.0.1.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Results shown at first.")
flags.mark_flags_as_required(["index"])


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # nothing leaves the machine
  from asen_jax.search import page as page_lib  # pylint: disable=g-import-not-at-top
  from asen_jax.search import service  # pylint: disable=g-import-not-at-top
  searcher = service.Searcher(_INDEX.value)   # cli.run turns user errors into one line
  page = page_lib.make_page(searcher, top_k=_TOP_K.value)
  print(f"Serving the search page of {_INDEX.value} at http://127.0.0.1:{_PORT.value} "
        "(Ctrl+C stops it).", flush=True)
  page.launch(server_name="127.0.0.1", server_port=_PORT.value,
              allowed_paths=page_lib.allowed_paths(searcher), show_error=True)


if __name__ == "__main__":
  cli.run(main, "app.py")
