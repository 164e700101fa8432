"""Tests for asen_jax.retrieval: MAP parity with a loop reference, random MAP."""
import numpy as np
import pytest

from asen_jax import retrieval


def _reference_ap(q_emb, q_attr, q_val, c_emb, c_attr, c_val, q_mask, c_mask):
  """Plain per-query loop in float64: rank by (score desc, index asc), AP over the ranking."""
  ap = np.full(len(q_attr), np.nan)
  for i in range(len(q_attr)):
    if not q_mask[i]:
      continue
    cand = np.flatnonzero(c_mask & (c_attr == q_attr[i]))
    scores = c_emb[cand].astype(np.float64) @ q_emb[i].astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    rel = (c_val[cand][order] == q_val[i]).astype(np.float64)
    n_rel = rel.sum()
    if n_rel == 0:
      ap[i] = 0.0
      continue
    prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    ap[i] = float(np.sum(prec * rel) / n_rel)
  return ap


def _reference_map(ap, q_attr, q_mask, num_attributes):
  per = {}
  for a in range(num_attributes):
    sel = q_mask & (q_attr == a)
    per[a] = (100 * ap[sel].mean(), int(sel.sum())) if sel.any() else (np.nan, 0)
  return 100 * ap[q_mask].mean(), per


def _random_problem(seed, quantised=True, num_q=70, num_c=160, dim=6, num_attr=4):
  rng = np.random.default_rng(seed)
  # Attributes with very different candidate counts; attribute 3 gets no queries.
  q_attr = rng.choice(3, size=num_q, p=[0.5, 0.3, 0.2])
  c_attr = rng.choice(num_attr, size=num_c, p=[0.15, 0.45, 0.3, 0.1])
  num_vals = np.array([3, 5, 4, 2])
  c_val = rng.integers(0, num_vals[c_attr])
  # Value num_vals[a] never occurs among candidates -> queries with no relevant candidate.
  q_val = rng.integers(0, num_vals[q_attr] + 1)
  if quantised:
    q_emb = rng.integers(-2, 3, size=(num_q, dim)).astype(np.float32)
    c_emb = rng.integers(-2, 3, size=(num_c, dim)).astype(np.float32)
  else:
    q_emb = rng.normal(size=(num_q, dim)).astype(np.float32)
    c_emb = rng.normal(size=(num_c, dim)).astype(np.float32)
  # Duplicated candidate rows (same embedding, maybe another value) -> exact score ties.
  dup_src = rng.choice(num_c, size=30, replace=False)
  dup_dst = rng.choice(num_c, size=30, replace=False)
  c_emb[dup_dst] = c_emb[dup_src]
  q_mask = rng.random(num_q) > 0.1
  c_mask = rng.random(num_c) > 0.1
  # Padded rows carry garbage labels, as an eval stream's padding might.
  q_attr = np.where(q_mask, q_attr, -1)
  c_attr = np.where(c_mask, c_attr, 99)
  return q_emb, q_attr, q_val, c_emb, c_attr, c_val, q_mask, c_mask


@pytest.mark.parametrize("seed,quantised", [(0, True), (1, True), (2, False)])
def test_map_matches_loop_reference(seed, quantised):
  q_emb, q_attr, q_val, c_emb, c_attr, c_val, q_mask, c_mask = _random_problem(seed, quantised)
  ref = _reference_ap(q_emb, q_attr, q_val, c_emb, c_attr, c_val, q_mask, c_mask)
  ap = retrieval.average_precision(q_emb, q_attr, q_val, c_emb, c_attr, c_val,
                                   query_mask=q_mask, cand_mask=c_mask, chunk_size=16)
  assert np.array_equal(np.isnan(ap), ~q_mask)
  np.testing.assert_allclose(ap[q_mask], ref[q_mask], atol=1e-6, rtol=0)
  # The problem must exercise the cases it claims to: ties, empty relevance, 0 < AP < 1.
  assert np.any(ref[q_mask] == 0.0) and np.any((ref > 0.05) & (ref < 0.95))

  names = ["a", "b", "c", "d"]
  res = retrieval.mean_average_precision(q_emb, q_attr, q_val, c_emb, c_attr, c_val, 4, names,
                                         query_mask=q_mask, cand_mask=c_mask, chunk_size=16)
  ref_overall, ref_per = _reference_map(ref, q_attr, q_mask, 4)
  assert res["map_overall"] == pytest.approx(ref_overall, abs=1e-4)  # percent: 1e-6 as a fraction
  for a, name in enumerate(names):
    assert res["num_queries"][name] == ref_per[a][1]
    if ref_per[a][1]:
      assert res["map_per_attribute"][name] == pytest.approx(ref_per[a][0], abs=1e-4)
    else:
      assert np.isnan(res["map_per_attribute"][name])
  assert res["num_queries"]["d"] == 0
  # Overall = query-weighted mean of the attribute MAPs.
  w = np.array([res["num_queries"][n] for n in names[:3]])
  m = np.array([res["map_per_attribute"][n] for n in names[:3]])
  assert res["map_overall"] == pytest.approx(float((w * m).sum() / w.sum()), abs=1e-9)


def test_tie_rule_is_score_desc_then_index_asc():
  q = np.array([[1.0]], np.float32)
  # Scores 2, 2, 2: the lower index ranks first, so the relevant one (index 2) is third.
  c = np.array([[2.0], [2.0], [2.0]], np.float32)
  ap = retrieval.average_precision(q, [0], [1], c, [0, 0, 0], [0, 0, 1])
  assert ap[0] == pytest.approx(1 / 3, abs=1e-7)
  # Same, relevant first -> AP 1; a higher score always wins over the index.
  ap = retrieval.average_precision(q, [0], [1], c * [[1.0], [1.0], [1.5]], [0, 0, 0], [0, 0, 1])
  assert ap[0] == pytest.approx(1.0, abs=1e-7)


def test_tie_groups_and_negative_scores_hand_computed():
  q = np.array([[1.0]], np.float32)
  # Scores by index 3, 5, 3, 1, 3, 3 -> ranking 1 | 0 2 4 5 (tie, by index) | 3.
  c = np.array([[3.0], [5.0], [3.0], [1.0], [3.0], [3.0]], np.float32)
  val = [0, 0, 1, 1, 0, 1]   # relevant: 2, 3, 5 -> ranks 3, 6, 5
  ap = retrieval.average_precision(q, [0], [1], c, [0] * 6, val)
  assert ap[0] == pytest.approx((1 / 3 + 2 / 5 + 3 / 6) / 3, abs=1e-7)  # 0.5 if ties ran backwards
  # Negative scores -1, -2, -1, -1: ranking 0 2 3 | 1; relevant 1, 3 -> ranks 4, 3.
  c = np.array([[-1.0], [-2.0], [-1.0], [-1.0]], np.float32)
  ap = retrieval.average_precision(q, [0], [1], c, [0] * 4, [0, 1, 0, 1])
  assert ap[0] == pytest.approx((1 / 3 + 2 / 4) / 2, abs=1e-7)  # 0.75 if -2 outranked -1


def test_identical_embeddings_rank_by_index():
  rng = np.random.default_rng(7)
  n = 300
  # Small integers: every summation order gives the same, exactly equal scores.
  q = rng.integers(-3, 4, size=(2, 5)).astype(np.float32)
  c = np.repeat(rng.integers(-3, 4, size=(1, 5)).astype(np.float32), n, axis=0)
  val = rng.integers(0, 3, n)
  c_mask = rng.random(n) > 0.2
  ap = retrieval.average_precision(q, [0, 0], [0, 2], c, np.zeros(n, int), val, cand_mask=c_mask)

  def ap_of(rel):
    return np.sum(np.cumsum(rel)[rel] / (np.flatnonzero(rel) + 1)) / rel.sum()

  for i, v in enumerate([0, 2]):
    rel = val[c_mask] == v   # every score is equal, so the ranking is the index order
    assert ap[i] == pytest.approx(ap_of(rel), abs=1e-6)
    assert abs(ap_of(rel) - ap_of(rel[::-1])) > 1e-3   # the order matters here


def test_rank_keys_order_is_score_desc_then_index_asc():
  import jax
  scores = np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, 1e-45, -1e-45, 1.5, -0.0, 3e38,
                     -3e38, 0.0, -1.5, 2.0 ** -126, 7.0], np.float32)
  padded = np.concatenate([scores, [9.0, -9.0]]).astype(np.float32)
  ok = np.arange(len(padded)) < len(scores)   # padding slots rank after every score, -inf too
  rel = (np.arange(len(padded)) % 3 == 0) & ok
  with jax.enable_x64(True):
    keys = np.asarray(retrieval._rank_keys(padded[None], rel[None], ok))[0]
  want = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))  # -0.0 == 0.0
  np.testing.assert_array_equal(np.argsort(keys)[:len(scores)], want)
  np.testing.assert_array_equal(keys & 1, rel)


def test_hand_computed_ap():
  q = np.array([[1.0]], np.float32)
  c = np.array([[3.0], [2.0], [1.0], [5.0]], np.float32)
  # Attribute 0 ranking: [rel, non, rel] -> (1 + 2/3) / 2; the attribute-1 candidate is ignored
  # even though it has the highest score and the same value.
  ap = retrieval.average_precision(q, [0], [7], c, [0, 0, 0, 1], [7, 1, 7, 7])
  assert ap[0] == pytest.approx((1 + 2 / 3) / 2, abs=1e-7)
  # No relevant candidate -> AP 0; attribute with no candidates at all -> AP 0.
  ap = retrieval.average_precision(np.ones((2, 1), np.float32), [0, 2], [3, 0], c,
                                   [0, 0, 0, 1], [7, 1, 7, 7])
  np.testing.assert_array_equal(ap, [0.0, 0.0])


def test_chunk_size_does_not_change_results():
  q_emb, q_attr, q_val, c_emb, c_attr, c_val, q_mask, c_mask = _random_problem(3)
  kw = dict(query_mask=q_mask, cand_mask=c_mask)
  ap7 = retrieval.average_precision(q_emb, q_attr, q_val, c_emb, c_attr, c_val, chunk_size=7, **kw)
  ap1000 = retrieval.average_precision(q_emb, q_attr, q_val, c_emb, c_attr, c_val,
                                       chunk_size=1000, **kw)
  np.testing.assert_array_equal(ap7, ap1000)


def test_bad_inputs_raise_one_clear_sentence():
  q = np.ones((2, 3), np.float32)
  c = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match="query_attr has 3 entries"):
    retrieval.average_precision(q, [0, 0, 0], [0, 0], c, [0] * 4, [0] * 4)
  with pytest.raises(ValueError, match="dimension 3 but cand_emb has 2"):
    retrieval.average_precision(q, [0, 0], [0, 0], c[:, :2], [0] * 4, [0] * 4)
  with pytest.raises(ValueError, match="NaN or inf"):
    retrieval.average_precision(q * np.nan, [0, 0], [0, 0], c, [0] * 4, [0] * 4)
  with pytest.raises(ValueError, match="num_attributes is 2"):
    retrieval.mean_average_precision(q, [0, 2], [0, 0], c, [0] * 4, [0] * 4, 2)
  with pytest.raises(ValueError, match="query_val must hold integer indices"):
    retrieval.average_precision(q, [0, 0], ["v-neck", "round"], c, [0] * 4, [0] * 4)
  with pytest.raises(ValueError, match="chunk_size"):
    retrieval.average_precision(q, [0, 0], [0, 0], c, [0] * 4, [0] * 4, chunk_size=0)
  with pytest.raises(ValueError, match="every query is masked out"):
    retrieval.mean_average_precision(q, [0, 0], [0, 0], c, [0] * 4, [0] * 4, 1,
                                     query_mask=[False, False])


def test_expected_random_ap_closed_form():
  # N=3, R=2: rankings {1,2}: 1, {1,3}: 5/6, {2,3}: 7/12 -> mean 29/36.
  np.testing.assert_allclose(retrieval.expected_random_ap([3, 2, 1, 5, 4], [2, 1, 1, 0, 4]),
                             [29 / 36, 0.75, 1.0, 0.0, 1.0], atol=1e-12)


@pytest.mark.parametrize("n,r", [(10, 3), (40, 1), (25, 12)])
def test_expected_random_ap_matches_monte_carlo(n, r):
  rng = np.random.default_rng(n * 100 + r)
  trials = 20000
  rel = np.zeros((trials, n))
  rel[:, :r] = 1
  rel = rng.permuted(rel, axis=1)
  prec = np.cumsum(rel, axis=1) / np.arange(1, n + 1)
  ap = (prec * rel).sum(1) / r
  stderr = ap.std() / np.sqrt(trials)
  assert abs(retrieval.expected_random_ap(n, r) - ap.mean()) < 4 * stderr


def test_random_ranking_map_matches_monte_carlo():
  _, q_attr, q_val, _, c_attr, c_val, q_mask, c_mask = _random_problem(4)
  res = retrieval.random_ranking_map(q_attr, q_val, c_attr, c_val, 4, per_attribute=True,
                                     query_mask=q_mask, cand_mask=c_mask)
  assert retrieval.random_ranking_map(q_attr, q_val, c_attr, c_val, 4, query_mask=q_mask,
                                      cand_mask=c_mask) == res["map_overall"]
  # Monte-Carlo over the full pipeline: random embeddings give a uniformly random ranking.
  rng = np.random.default_rng(5)
  maps = []
  for _ in range(40):
    q = rng.normal(size=(len(q_attr), 8)).astype(np.float32)
    c = rng.normal(size=(len(c_attr), 8)).astype(np.float32)
    maps.append(retrieval.mean_average_precision(q, q_attr, q_val, c, c_attr, c_val, 4,
                                                 query_mask=q_mask, cand_mask=c_mask)["map_overall"])
  stderr = np.std(maps) / np.sqrt(len(maps))
  assert abs(res["map_overall"] - np.mean(maps)) < 4 * stderr + 1e-9
  # And exactly the per-query closed form averaged by hand.
  per = []
  for i in np.flatnonzero(q_mask):
    cand = c_mask & (c_attr == q_attr[i])
    per.append(retrieval.expected_random_ap(cand.sum(), (cand & (c_val == q_val[i])).sum()))
  assert res["map_overall"] == pytest.approx(100 * np.mean(per), abs=1e-10)
  assert res["num_queries"]["attribute_3"] == 0


def test_embeddings_sharded_over_a_mesh():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  q_emb, q_attr, q_val, c_emb, c_attr, c_val, q_mask, c_mask = _random_problem(6, num_q=64,
                                                                               num_c=160)
  kw = dict(query_mask=q_mask, cand_mask=c_mask)
  want = retrieval.average_precision(q_emb, q_attr, q_val, c_emb, c_attr, c_val, **kw)
  mesh = jax.make_mesh((8,), ("data",))
  rows = NamedSharding(mesh, P("data"))
  q_dev, c_dev = jax.device_put(q_emb, rows), jax.device_put(c_emb, rows)
  got = retrieval.average_precision(q_dev, q_attr, q_val, c_dev, c_attr, c_val, **kw)
  np.testing.assert_array_equal(got, want)
  with jax.set_mesh(mesh):
    got = retrieval.average_precision(q_dev, q_attr, q_val, c_dev, c_attr, c_val, **kw)
  np.testing.assert_array_equal(got, want)
