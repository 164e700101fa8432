"""Data: synthetic garments, the TFDS builder of the official layout, grain pipelines."""
from asen_jax.data.builder import DatasetInfo
from asen_jax.data.builder import dataset_info
from asen_jax.data.builder import prepare_dataset
from asen_jax.data.pipeline import eval_stream_length
from asen_jax.data.views import load_view
from asen_jax.data.pipeline import make_eval_stream
from asen_jax.data.pipeline import make_train_loader
