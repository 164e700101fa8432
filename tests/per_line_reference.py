"""The evaluation embedding as it was before evaluation by image: every line of a query or
candidate file loaded and run through both branches on its own (the tests' and the benchmark's
reference)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from asen_jax import data as data_lib
from asen_jax import model as model_lib
from asen_jax import parallel
from asen_jax import roi


def line_embedding(variables, images, hires, attributes, *, model, joint, frame_size, local_size,
                   threshold, beta):
  """uint8 views, one per line -> (retrieval embedding, global attention map, RoI boxes)."""
  x = model_lib.normalize_images(images)
  g, attmap = model.apply(variables, x, attributes, method="embed_global")
  if not joint:
    boxes = jnp.broadcast_to(jnp.array([0, 0, frame_size, frame_size], jnp.float32),
                             (x.shape[0], 4))
    return model_lib.l2_normalize(g.astype(jnp.float32)), attmap, boxes
  crops, boxes = roi.roi_crops(attmap, hires, frame_size, local_size, threshold)
  l, _ = model.apply(variables, model_lib.normalize_images(crops), attributes, method="embed_local")
  emb = model_lib.fused_embedding(g.astype(jnp.float32), l.astype(jnp.float32), beta)
  return emb, attmap, boxes


def make_line_embed_fn(config, model, joint, mesh):
  fn = functools.partial(
      line_embedding, model=model, joint=joint, frame_size=config.data.image_size,
      local_size=config.model.local_size, threshold=config.model.roi_threshold,
      beta=config.eval.beta)
  return jax.jit(fn, out_shardings=parallel.batch_sharding(mesh))


def embed_file(config, variables, line_fn, mesh, split, which):
  """{emb, attmap, box, gt_box, attribute, value, image_id} of every line of one file."""
  parts = {}
  for batch in data_lib.make_eval_stream(config, split, which,
                                         batch_size=config.eval.batch_size):
    arrays = parallel.shard_batch(mesh, (batch["image"], batch["hires"], batch["attribute"]))
    emb, attmap, box = jax.device_get(line_fn(variables, *arrays))
    keep = np.asarray(batch["mask"])
    for k, v in dict(emb=emb, attmap=attmap, box=box, gt_box=batch["box"],
                     attribute=batch["attribute"], value=batch["value"],
                     image_id=batch["image_id"]).items():
      parts.setdefault(k, []).append(np.asarray(v)[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}
