"""What an approximate index costs in retrieval quality: MAP through an index and recall@k."""
import numpy as np

from asen_jax.search import faiss_index


def average_precision(ranked_relevant, num_relevant):
  """AP of one ranking (bool [k], best first) with `num_relevant` relevant items in the catalog;
  relevant items the ranking never returned count as found at no rank (precision 0)."""
  rel = np.asarray(ranked_relevant, bool)
  if num_relevant == 0:
    return 0.0
  hits = np.cumsum(rel)
  return float(np.sum(hits[rel] / (np.flatnonzero(rel) + 1)) / num_relevant)


def map_through_index(faiss_ix, query_emb, query_value, item_value, nprobe=None):
  """Mean AP (%) of queries (float32 [q, d], int values [q]) ranked by searching `faiss_ix` for
  every vector it holds; `item_value` maps an item id to its value (np array)."""
  scores, ids = faiss_index.search(faiss_ix, query_emb, faiss_ix.ntotal, nprobe)
  del scores
  aps = []
  for row, v in zip(ids, query_value):
    got = row[row >= 0]
    aps.append(average_precision(item_value[got] == v, int(np.sum(item_value == v))))
  return 100.0 * float(np.mean(aps))


def recall_at_k(exact_ids, approx_ids, k=10):
  """Mean share of the exact top-k ids that the approximate top-k also returns."""
  exact, approx = np.asarray(exact_ids)[:, :k], np.asarray(approx_ids)[:, :k]
  return float(np.mean([len(set(e) & set(a)) / len(e) for e, a in zip(exact, approx)]))
