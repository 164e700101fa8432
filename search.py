"""Attribute-specific search of a catalog: build, add, remove, query.

  python search.py build --config configs/synthetic.py:joint --checkpoint runs/demo/joint \
      --split test --index runs/demo/index [--kind flat|sq8|pq|ivf]
  python search.py build ... --images photos/ (image files or folders, searched recursively)
  python search.py add --index DIR --images new/
  python search.py remove --index DIR --images old.jpg
  python search.py extend --index DIR --config configs/synthetic.py:joint --checkpoint runs/ext
      (the attributes that a train.py ...:extend checkpoint added; the others are not re-embedded)
  python search.py query --index DIR --image q.jpg --attribute neckline --top_k 10 [--json]
      [--picture out.png]

add and query use the checkpoint and config the index was built with (or --checkpoint/--config,
which must be the same model).
"""
from asen_jax import allocator

allocator.preload()   # before jax starts: see asen_jax/allocator.py

import json

from absl import flags
from absl import logging
from ml_collections import config_flags

from asen_jax import cli

COMMANDS = ("build", "add", "remove", "extend", "query")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<dataset>.py:<stage> (build, extend; add/query default to the "
    "index's).",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint folder or .pth.tar "
                                  "(build, extend; add/query default to the index's).")
_INDEX = flags.DEFINE_string("index", None, "Index folder.")
_SPLIT = flags.DEFINE_enum("split", None, ["valid", "test"], "build: index this dataset split.")
_IMAGES = flags.DEFINE_list("images", None, "build/add/remove: image files or folders.")
_KIND = flags.DEFINE_enum("kind", "flat", ["flat", "sq8", "pq", "ivf"],
                          "flat: exact; sq8: 8-bit scalar, 1/4 of the memory; pq: product "
                          "quantiser, --pq_bytes a vector; ivf: IVF-PQ for millions of images.")
_PQ_BYTES = flags.DEFINE_integer("pq_bytes", 64, "pq/ivf: bytes a vector (divides the dimension).")
_NLIST = flags.DEFINE_integer("nlist", 0, "ivf: inverted lists (0: about 4 sqrt(catalog size)).")
_NPROBE = flags.DEFINE_integer("nprobe", None, "ivf: lists a query visits (build: the default "
                               "stored with the index, 16 if unset).")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", 100_000, "pq/ivf/sq8: at most this many "
                                   "vectors (a random sample) train the quantisers.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images a step (default: eval.batch_size).")
_IMAGE = flags.DEFINE_string("image", None, "query: the query image file.")
_ATTRIBUTE = flags.DEFINE_string("attribute", None, "query: the attribute to compare by.")
_TOP_K = flags.DEFINE_integer("top_k", 10, "query: results to print.")
_JSON = flags.DEFINE_bool("json", False, "query: print JSON instead of a table.")
_PICTURE = flags.DEFINE_string("picture", None, "query: write the query's attention map, RoI "
                               "box and the top K to this PNG/JPEG.")


def _require(*names):
  missing = [n for n in names if flags.FLAGS[n].value is None]
  if missing:
    raise ValueError(f"This command needs --{', --'.join(missing)}.")


def run(command):
  from asen_jax import viz  # pylint: disable=g-import-not-at-top
  from asen_jax.search import service  # pylint: disable=g-import-not-at-top
  _require("index")
  if command == "build":
    _require("config", "checkpoint")
    spec = dict(kind=_KIND.value, pq_bytes=_PQ_BYTES.value, nlist=_NLIST.value,
                train_size=_TRAIN_SIZE.value)
    index = service.build(_CONFIG.value, _CHECKPOINT.value, _INDEX.value, spec,
                          split=_SPLIT.value, images=_IMAGES.value,
                          nprobe=16 if _NPROBE.value is None else _NPROBE.value,
                          batch_size=_BATCH.value)
    print(f"Indexed {len(index.items)} images x {len(index.attributes)} attributes "
          f"({_KIND.value}) into {_INDEX.value}.")
  elif command == "add":
    _require("images")
    n = service.add(_INDEX.value, _IMAGES.value, config=_CONFIG.value,
                    checkpoint=_CHECKPOINT.value, batch_size=_BATCH.value)
    print(f"Added {n} images to {_INDEX.value}.")
  elif command == "extend":
    _require("config", "checkpoint")
    new = service.extend(_INDEX.value, _CONFIG.value, _CHECKPOINT.value, batch_size=_BATCH.value)
    print(f"Indexed {', '.join(new)} in {_INDEX.value}; its other attributes were kept as they "
          "were.")
  elif command == "remove":
    _require("images")
    print(f"Removed {service.remove(_INDEX.value, _IMAGES.value)} images from {_INDEX.value}.")
  else:
    _require("image", "attribute")
    searcher = service.Searcher(_INDEX.value, _CONFIG.value, _CHECKPOINT.value)
    results, extras = searcher.query(_IMAGE.value, _ATTRIBUTE.value, _TOP_K.value, _NPROBE.value)
    if _PICTURE.value:
      viz.save_panel(searcher.picture(results, extras, _ATTRIBUTE.value), _PICTURE.value)
    if _JSON.value:
      print(json.dumps({"attribute": _ATTRIBUTE.value, "image": _IMAGE.value,
                        "results": results}, indent=1))
    else:
      print(f"{'rank':>4}  {'score':>8}  path")
      for r in results:
        print(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['path']}")
    if _PICTURE.value:
      print(f"Picture: {_PICTURE.value}")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise SystemExit(f"search.py: give one command, {', '.join(COMMANDS)} (got "
                     f"{' '.join(argv[1:]) or 'none'}); see the top of search.py.")
  logging.set_verbosity(logging.ERROR)   # tqdm shows progress; orbax's notes would bury it
  if _PICTURE.value:   # checked before the model loads
    cli.check_writable(_PICTURE.value, "--picture", is_dir=False)
  run(argv[1])   # cli.run turns user errors into one line


if __name__ == "__main__":
  cli.run(main, "search.py")
