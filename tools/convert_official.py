"""Converts an official ASEN++ PyTorch checkpoint into a checkpoint folder this project loads.

  python tools/convert_official.py --checkpoint model_best.pth.tar \
      --config configs/fashionai.py:joint --output checkpoints/official_fashionai

The architecture is read off the checkpoint's keys and must match the config's model fields;
its attribute count must match the config's attributes. A stage-1 file (global keys only)
becomes a 'global' checkpoint, a stage-2 file a 'joint' one.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asen_jax import checkpoint as ckpt_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from asen_jax import resnet  # noqa: E402  pylint: disable=g-import-not-at-top

# Fields that decide the variables' shapes; compared between checkpoint and config.
_GLOBAL_FIELDS = ("global_backbone", "width", "attr_dim", "global_common_dim", "reduction",
                  "embed_dim")
_LOCAL_FIELDS = ("local_backbone", "local_common_dim")


def convert_checkpoint(checkpoint_path, config, output_dir):
  """Reads, converts and checks `checkpoint_path`; writes it to `output_dir`; -> (variables, meta)."""
  from asen_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  if not checkpoint_path.endswith(ckpt_lib.OFFICIAL_SUFFIXES):
    raise ValueError(f"{checkpoint_path} is not an official .pth/.pth.tar file; checkpoints of "
                     "this project need no conversion.")
  variables, info = ckpt_lib.load_model(checkpoint_path)
  attributes, num_values = list(config.data.attributes), list(config.data.num_values)
  if not attributes:  # e.g. the synthetic config reads them from the dataset
    dataset = data_lib.dataset_info(config)
    attributes, num_values = list(dataset.attributes), list(dataset.num_values)
  ckpt_lib.check_attributes(info, attributes, checkpoint_path)
  fields = _GLOBAL_FIELDS + (_LOCAL_FIELDS if info["stage"] == "joint" else ())
  # Width is compared as the stem's channel count: the file only tells 64 * width.
  same = lambda f, a, b: (resnet.scaled_channels(64, a) == resnet.scaled_channels(64, b)
                          if f == "width" else a == b)
  differ = [f"{f} = {info['model'][f]!r} in the file, {config.model[f]!r} in the config"
            for f in fields if not same(f, info["model"][f], config.model[f])]
  if differ:
    raise ValueError(f"{checkpoint_path} does not match config.model: " + "; ".join(differ)
                     + "; override those config fields.")
  # The official network runs its global backbone at the paper's stride, whatever the config
  # asks (the keys cannot tell a stride), as evaluating the .pth file directly does.
  model = dict(config.model.to_dict(), global_output_stride=info["model"]["global_output_stride"])
  meta = {"attributes": attributes, "num_values": num_values,
          "stage": info["stage"], "model": model, "bn_stats": info["bn_stats"],
          "source": os.path.abspath(checkpoint_path)}
  ckpt_lib.save_model_variables(os.path.abspath(output_dir), variables, meta)
  return variables, meta


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    _, meta = convert_checkpoint(f.checkpoint, f.config, f.output)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"Error: {e}")
  print(f"Wrote {f.output}: stage {meta['stage']}, {len(meta['attributes'])} attributes.")


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # Flags are defined here only, so importing this file (tests) defines none.
  config_flags.DEFINE_config_file("config", None, "configs/<dataset>.py:<stage>",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "official model_best.pth.tar / checkpoint.pth.tar")
  flags.DEFINE_string("output", None, "folder to write (orbax model checkpoint)")
  flags.mark_flags_as_required(["config", "checkpoint", "output"])
  cli.run(main, "convert_official.py")
