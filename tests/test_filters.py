"""Tests for spmdnnx._filters: every filter form, combinators and errors."""

import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx._filters import filters_to_predicates, to_predicate


class Count(nnx.Variable):
  pass


class LoRAParam(nnx.Param):
  pass


P = nnx.Param(jnp.ones(2))
B = nnx.BatchStat(jnp.zeros(2))
C = Count(jnp.array(0))
L = LoRAParam(jnp.ones(2))
RNG = nnx.Rngs(dropout=0).dropout.key  # an RngKey tagged 'dropout'


def matches(filt, path, value):
  return bool(to_predicate(filt)(path, value))


def test_type_filter_matches_subclasses():
  assert matches(nnx.Param, ("w",), P)
  assert matches(nnx.Param, ("w",), L)
  assert not matches(nnx.Param, ("m",), B)
  assert matches(nnx.Variable, ("c",), C)
  assert matches(LoRAParam, ("w",), L)
  assert not matches(LoRAParam, ("w",), P)
  assert matches(Count, ("c",), C)


def test_of_type_repr_and_equality():
  assert repr(to_predicate(nnx.Param)) == "OfType(Param)"
  assert to_predicate(nnx.Param) == nnx.OfType(nnx.Param)


@pytest.mark.parametrize("filt", [..., True, nnx.Everything()])
def test_everything_forms(filt):
  assert matches(filt, ("a",), P) and matches(filt, (), 3)


@pytest.mark.parametrize("filt", [None, False, nnx.Nothing()])
def test_nothing_forms(filt):
  assert not matches(filt, ("a",), P)


def test_everything_nothing_are_singletons_with_repr():
  assert nnx.Everything() is nnx.Everything()
  assert repr(nnx.Everything()) == "Everything()"
  assert repr(nnx.Nothing()) == "Nothing()"
  assert to_predicate(...) is nnx.Everything()
  assert to_predicate(None) is nnx.Nothing()


def test_string_matches_type_name_including_bases():
  assert matches("Param", ("w",), P)
  assert matches("Param", ("w",), L)  # LoRAParam's base is Param
  assert matches("LoRAParam", ("w",), L)
  assert not matches("LoRAParam", ("w",), P)
  assert matches("BatchStat", ("m",), B)
  assert not matches("BatchStat", ("w",), P)
  assert matches("Count", ("c",), C)


def test_string_matches_tag():
  assert matches("dropout", ("dropout", "key"), RNG)
  assert not matches("params", ("dropout", "key"), RNG)
  assert matches(nnx.WithTag("dropout"), (), RNG)
  assert not matches(nnx.WithTag("dropout"), (), P)


def test_path_contains():
  f = nnx.PathContains("mean")
  assert matches(f, ("bn", "mean"), B)
  assert not matches(f, ("bn", "var"), B)
  # Integer keys compare as given or as strings.
  assert matches(nnx.PathContains(0), ("layers", 0, "w"), P)
  assert matches(nnx.PathContains("0"), ("layers", 0, "w"), P)
  assert not matches(nnx.PathContains(1), ("layers", 0, "w"), P)


def test_all_any_not():
  f = nnx.All(nnx.Param, nnx.PathContains("decoder"))
  assert matches(f, ("decoder", "w"), P)
  assert not matches(f, ("encoder", "w"), P)
  assert not matches(f, ("decoder", "m"), B)
  g = nnx.Any(nnx.BatchStat, nnx.PathContains("bias"))
  assert matches(g, ("x", "m"), B)
  assert matches(g, ("x", "bias"), P)
  assert not matches(g, ("x", "w"), P)
  assert matches(nnx.Not(nnx.Param), ("m",), B)
  assert not matches(nnx.Not(nnx.Param), ("w",), P)
  assert matches(nnx.All(nnx.Param, nnx.Not(LoRAParam)), ("w",), P)
  assert not matches(nnx.All(nnx.Param, nnx.Not(LoRAParam)), ("w",), L)


def test_empty_all_and_any():
  assert matches(nnx.All(), ("a",), P)
  assert not matches(nnx.Any(), ("a",), P)


def test_combinators_equality_hash_repr():
  assert nnx.All(nnx.Param, "x") == nnx.All(nnx.Param, "x")
  assert hash(nnx.Any(nnx.Param)) == hash(nnx.Any(nnx.Param))
  assert nnx.All(nnx.Param) != nnx.Any(nnx.Param)
  assert nnx.Not(nnx.Param) == nnx.Not(nnx.Param)
  assert repr(nnx.Any(nnx.Param, "x")) == "Any(<class 'spmdnnx._variables.Param'>, 'x')"
  assert repr(nnx.Not(nnx.Param)) == "Not(<class 'spmdnnx._variables.Param'>)"


def test_callable_filter():
  f = lambda path, value: path[-1] == "w"  # noqa: E731
  assert matches(f, ("a", "w"), P)
  assert not matches(f, ("a", "b"), P)
  assert to_predicate(f) is f


@pytest.mark.parametrize("container", [tuple, list])
def test_tuple_and_list_mean_any(container):
  f = container([nnx.BatchStat, "Count"])
  assert matches(f, ("m",), B)
  assert matches(f, ("c",), C)
  assert not matches(f, ("w",), P)
  assert not matches(container(), ("w",), P)


def test_nested_tuples():
  f = (nnx.Param, (nnx.BatchStat, Count))
  assert matches(f, ("c",), C)


@pytest.mark.parametrize("bad", [3, 2.5, object(), b"Param"])
def test_unknown_filter_error(bad):
  with pytest.raises(errors.FilterError,
                     match=rf"of type {type(bad).__name__}\) is not a filter\. Use a "
                     r"Variable type \(e\.g\. nnx\.Param\), '\.\.\.', a string"):
    to_predicate(bad)


def test_unknown_filter_inside_combinator_errors_at_construction():
  with pytest.raises(errors.FilterError, match=r"^3 \(of type int\) is not a filter"):
    nnx.Any(nnx.Param, 3)
  with pytest.raises(errors.FilterError, match=r"is not a filter"):
    nnx.Not(4.0)


def test_unknown_filter_in_split_errors():

  class M(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))

  with pytest.raises(errors.FilterError, match=r"^7 \(of type int\) is not a filter"):
    nnx.split(M(), 7, ...)


def test_filter_error_is_type_error():
  assert issubclass(errors.FilterError, TypeError)


def test_ellipsis_not_last_error():
  with pytest.raises(errors.FilterError,
                     match=r"^`\.\.\.` or `True` can only be used as the last filters\. "
                     r"Filter '\.\.\.' \(Everything\) appears at position 0 of 2; "
                     r"it matches all remaining state, so the filters after it would get "
                     r"nothing\. Put '\.\.\.' last\."):
    filters_to_predicates((..., nnx.Param))


def test_ellipsis_not_last_error_in_split():

  class M(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))

  with pytest.raises(errors.FilterError, match=r"appears at position 1 of 3"):
    nnx.split(M(), nnx.BatchStat, True, nnx.Param)


def test_ellipsis_last_ok():
  preds = filters_to_predicates((nnx.Param, ...))
  assert len(preds) == 2
  assert preds[1] is nnx.Everything()


def test_path_contains_exact_false_matches_substrings():
  P = nnx.Param(0.0)
  assert matches(nnx.PathContains("att", exact=False), ("layers", "attn", "w"), P)
  assert not matches(nnx.PathContains("att"), ("layers", "attn", "w"), P)
  assert matches(nnx.PathContains(1, exact=False), ("layers", 12, "w"), P)


def test_trailing_everything_filters_may_repeat():
  preds = filters_to_predicates((nnx.Param, ..., True))
  assert len(preds) == 3


def test_filter_error_is_also_a_value_error():
  with pytest.raises(ValueError, match="is not a filter"):
    to_predicate(7)
