"""Axis rules: how logical axis names map onto mesh axes.

An `AxisRules` is an ordered list of ``(logical_name, mesh_axes)`` pairs, where
``mesh_axes`` is one mesh axis name, a tuple of them (the dimension is split
over their product) or None (replicate). One array is resolved at a time:

* rules are tried in list order;
* a rule applies to a still-unassigned dimension carrying its logical name
  when none of its mesh axes is already used by another dimension of the same
  array and the product of its mesh-axis sizes divides that dimension;
* a rule whose mesh axes have total size 1 splits nothing, so it does not
  claim the dimension: the name's next rule gets its chance (``("mlp",
  "tensor"), ("mlp", "fsdp")`` puts ``mlp`` on ``fsdp`` when ``tensor=1``).
  Only if no later rule takes the dimension does the spec name those size-1
  axes (the same layout as replicated);
* a ``None`` rule settles its dimension as replicated;
* a dimension that no rule could take is replicated. When a rule was skipped
  because its sizes did not divide the dimension and the dimension ended up
  unsplit anyway (replicated, or on mesh axes of size 1), a `ShardingWarning`
  names the path; an explicit ``None`` fallback rule silences it;
* a logical name that no rule mentions is an `AxisRulesError` naming the
  path, unless the rules were made with ``allow_unknown=True``.

>>> from jax.sharding import PartitionSpec as P
>>> rules = AxisRules([("head", "model"), ("embed", "model"),
...                    ("embed", "data"), ("vocab", "model")])
>>> mesh = {"data": 2, "model": 4}
>>> rules.resolve(("embed", "head"), (8, 8), mesh)
P('data', 'model')
>>> rules.resolve(("vocab", "embed"), (8, 8), mesh)
P(None, 'model')
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import pathlib
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from jax.sharding import PartitionSpec

from spmdnnx import errors
from spmdnnx.spmd import _mesh_axes as mesh_axes_lib

#: One rule's right-hand side: an axis, several axes, or None (replicate).
MeshAxes = Union[str, tuple[str, ...], None]
Rule = tuple[str, MeshAxes]

#: The documented logical axis vocabulary (see docs/sharding.md); every
#: shipped rule set has a rule for each of these names.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "kv_heads", "vocab", "norm",
                "layers", "expert", "conv_in", "conv_out", "spatial",
                "activation_batch", "activation_length", "activation_embed",
                "activation_mlp", "activation_heads", "activation_kv_heads",
                "activation_head_dim", "activation_vocab")

#: Environment variable naming an extra directory of ``<name>.json`` rule sets;
#: a file there takes precedence over the shipped preset of the same name.
RULES_DIR_ENV = "SPMDNNX_RULES_DIR"

#: The shipped rule sets are package data: ``spmdnnx/spmd/presets/*.json``.
_PRESETS = importlib.resources.files("spmdnnx.spmd") / "presets"


def _preset_files() -> dict[str, Any]:
  """``{name: file}`` of every loadable preset (package data, then $SPMDNNX_RULES_DIR)."""
  files = {f.name[:-5]: f for f in _PRESETS.iterdir() if f.name.endswith(".json")}
  extra = os.environ.get(RULES_DIR_ENV)
  if extra and pathlib.Path(extra).is_dir():
    files.update((f.stem, f) for f in pathlib.Path(extra).glob("*.json"))
  return files


def _rhs_str(axes: MeshAxes) -> str:
  if axes is None:
    return "None (replicate)"
  if isinstance(axes, str):
    return axes
  return "(" + ", ".join(axes) + ")"


def _normalize_rule(index: int, entry: Any, problems: list[str]) -> Rule | None:
  if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
    problems.append(f"entry {index} {entry!r} is not a (logical_name, mesh_axes) pair")
    return None
  name, axes = entry
  if not isinstance(name, str) or not name:
    problems.append(f"entry {index} {entry!r}: logical name must be a non-empty str")
    return None
  if axes is None or isinstance(axes, str):
    return (name, axes)
  if not isinstance(axes, Sequence) or not all(isinstance(a, str) for a in axes):
    problems.append(f"entry {index} {entry!r}: mesh axes must be a str, a tuple of "
                    "str or None")
    return None
  axes = tuple(axes)
  repeated = sorted({a for a in axes if axes.count(a) > 1})
  if repeated:
    problems.append(f"entry {index} {entry!r} uses mesh axis {repeated[0]!r} twice")
    return None
  if not axes:
    return (name, None)
  return (name, axes[0]) if len(axes) == 1 else (name, axes)


def _as_pairs(rules: Any) -> Iterable[Any]:
  if isinstance(rules, AxisRules):
    return rules.rules
  if isinstance(rules, Mapping):
    return list(rules.items())
  if isinstance(rules, (str, bytes)):
    raise errors.AxisRulesError(
        f"Expected a list of (logical_name, mesh_axes) pairs, got the string "
        f"{rules!r}. To load a shipped rule set use AxisRules.load({rules!r}).",
        rules=rules)
  return rules


@dataclasses.dataclass(frozen=True)
class Resolution:
  """What resolving one array's logical axes produced (see `AxisRules.resolve_detailed`).

  Attributes:
    spec: the PartitionSpec, one entry per dimension.
    unknown: logical names no rule mentions (replicated in ``spec``).
    undivided: ``(dim, logical_name, size, tried)`` for every dimension left
      unsplit after rules were skipped because their mesh-axes product did not
      divide it; ``tried`` lists ``(mesh_axes, product)`` of those rules.
    missing: mesh axes named by applicable rules that the mesh lacks.
  """

  spec: PartitionSpec
  unknown: tuple[str, ...] = ()
  undivided: tuple[tuple[int, str, int, tuple], ...] = ()
  missing: tuple[str, ...] = ()


_UNSET: Any = object()


class AxisRules:
  """An ordered, immutable list of ``(logical_name, mesh_axes)`` rules.

  Validated when created and frozen after: assigning an attribute raises
  `dataclasses.FrozenInstanceError`; `replace` returns a new, re-validated
  `AxisRules`. Equal rule lists (and ``allow_unknown``) compare and hash equal;
  the hash is computed once.

  Args:
    rules: pairs (lists from JSON are accepted), a ``{name: mesh_axes}`` dict,
      or another `AxisRules` (copied).
    allow_unknown: replicate dimensions whose logical name no rule mentions
      instead of raising `AxisRulesError`.
    name: a label shown when printing (preset name, file name).

  Raises:
    AxisRulesError: if an entry is not a pair of a name and mesh axes, or one
      rule names the same mesh axis twice (all bad entries are listed).

  >>> rules = AxisRules({"batch": ("data", "fsdp"), "embed": "fsdp"})
  >>> rules.lookup("batch")
  (('data', 'fsdp'),)
  >>> rules.replace(allow_unknown=True).allow_unknown
  True
  """

  __slots__ = ("_rules", "_names", "_allow_unknown", "_name", "_hash")

  def __init__(self, rules: Any = (), *, allow_unknown: bool | None = None,
               name: str | None = None):
    if allow_unknown is None:
      allow_unknown = rules.allow_unknown if isinstance(rules, AxisRules) else False
    if name is None and isinstance(rules, AxisRules):
      name = rules.name
    problems: list[str] = []
    try:
      entries = list(_as_pairs(rules))
    except TypeError:
      raise errors.AxisRulesError(
          f"Expected a list of (logical_name, mesh_axes) pairs, got "
          f"{type(rules).__name__}.", rules=name) from None
    normalized = [_normalize_rule(i, e, problems) for i, e in enumerate(entries)]
    if problems:
      raise errors.AxisRulesError(
          f"Invalid axis rules{_label(name)}: {errors.format_paths(problems)}. Each "
          "rule is (logical_name, mesh_axes) with mesh_axes a mesh axis name, a "
          "tuple of distinct names, or None to replicate.", rules=name, entries=problems)
    rules_t: tuple[Rule, ...] = tuple(normalized)  # type: ignore[arg-type]
    init = object.__setattr__
    init(self, "_rules", rules_t)
    init(self, "_names", frozenset(n for n, _ in rules_t))
    init(self, "_allow_unknown", bool(allow_unknown))
    init(self, "_name", name)
    init(self, "_hash", hash((rules_t, bool(allow_unknown))))

  def __setattr__(self, attr: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(
        f"AxisRules is immutable (cannot set {attr!r}); use "
        f"rules.replace({attr.lstrip('_')}=...) for a new, validated AxisRules.")

  def __delattr__(self, attr: str) -> None:
    raise dataclasses.FrozenInstanceError(f"AxisRules is immutable (cannot delete {attr!r}).")

  def __reduce__(self) -> tuple:
    return (_rebuild_rules, (self._rules, self._allow_unknown, self._name))

  def replace(self, *, rules: Any = _UNSET, allow_unknown: Any = _UNSET,
              name: Any = _UNSET) -> "AxisRules":
    """A new `AxisRules` with some fields changed, validated like the constructor.

    >>> AxisRules([("embed", "fsdp")]).replace(rules=[("embed", None)]).rules
    (('embed', None),)

    Raises:
      AxisRulesError: as the constructor.
    """
    return AxisRules(self._rules if rules is _UNSET else rules,
                     allow_unknown=self._allow_unknown if allow_unknown is _UNSET else allow_unknown,
                     name=self._name if name is _UNSET else name)

  @property
  def allow_unknown(self) -> bool:
    """Whether dimensions with a logical name no rule mentions are replicated."""
    return self._allow_unknown

  @property
  def name(self) -> str | None:
    """A label (preset or file name) shown when printing."""
    return self._name

  # --- container protocol ----------------------------------------------------
  @property
  def rules(self) -> tuple[Rule, ...]:
    """The rules, in priority order."""
    return self._rules

  @property
  def names(self) -> frozenset[str]:
    """Every logical name some rule mentions."""
    return self._names

  @property
  def mesh_axis_names(self) -> tuple[str, ...]:
    """Every mesh axis some rule names, in first-use order."""
    seen: dict[str, None] = {}
    for _, axes in self._rules:
      for a in mesh_axes_lib.entry_axes(axes):
        seen.setdefault(a, None)
    return tuple(seen)

  def lookup(self, name: str) -> tuple[MeshAxes, ...]:
    """The right-hand sides of the rules for ``name``, in priority order."""
    return tuple(axes for n, axes in self._rules if n == name)

  def __iter__(self) -> Iterator[Rule]:
    return iter(self._rules)

  def __len__(self) -> int:
    return len(self._rules)

  def __contains__(self, name: object) -> bool:
    return name in self._names

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, AxisRules) and self._rules == other._rules
            and self.allow_unknown == other.allow_unknown)

  def __hash__(self) -> int:
    return self._hash

  # --- composition ------------------------------------------------------------
  def __add__(self, other: Any) -> "AxisRules":
    """Concatenation: this list's rules keep priority over ``other``'s."""
    other = other if isinstance(other, AxisRules) else AxisRules(other)
    return AxisRules(self._rules + other._rules,
                     allow_unknown=self.allow_unknown or other.allow_unknown)

  def __radd__(self, other: Any) -> "AxisRules":
    return AxisRules(other) + self

  def override(self, rules: Any = (), **by_name: MeshAxes) -> "AxisRules":
    """Replaces every rule for the given logical names.

    The new rules for a name take the place of that name's first old rule (or
    go at the end if it had none); old rules for the name are dropped.

    >>> r = AxisRules([("embed", "fsdp"), ("mlp", "tensor")])
    >>> r.override(embed=None).rules
    (('embed', None), ('mlp', 'tensor'))
    """
    new = list(AxisRules(rules)._rules) + list(AxisRules(list(by_name.items()))._rules)
    replaced = {n for n, _ in new}
    out: list[Rule] = []
    placed: set[str] = set()
    for n, axes in self._rules:
      if n not in replaced:
        out.append((n, axes))
      elif n not in placed:
        out.extend(r for r in new if r[0] == n)
        placed.add(n)
    out.extend(r for r in new if r[0] not in placed)
    return AxisRules(out, allow_unknown=self.allow_unknown, name=self.name)

  # --- validation and resolution ----------------------------------------------
  def validate(self, mesh: Any) -> None:
    """Checks that every mesh axis these rules name exists in ``mesh``.

    Raises:
      AxisRulesError: listing each rule that names a missing mesh axis.
    """
    sizes = mesh_axes_lib.axis_sizes(mesh)
    pairs = [(n, a, m) for n, a in self._rules
             for m in mesh_axes_lib.entry_axes(a) if m not in sizes]
    if pairs:
      bad = [f"({n!r} -> {_rhs_str(a)}) names {m!r}" for n, a, m in pairs]
      raise errors.AxisRulesError(
          f"Axis rules{_label(self.name)} name mesh axes the mesh does not have: "
          f"{errors.format_paths(bad)}. The mesh has axes {tuple(sizes)}. Add the "
          "axis to the mesh (size 1 is fine; spmdnnx.make_mesh keeps every axis) "
          "or override those rules.", rules=self.name,
          axes=sorted({m for *_, m in pairs}), mesh=dict(sizes))

  def resolve_detailed(self, logical_axes: Sequence[str | None], shape: Sequence[int],
                       mesh: Any) -> Resolution:
    """Resolves one array's logical axes without raising or warning.

    Args:
      logical_axes: one logical name (or None) per dimension.
      shape: the array's shape (same length as ``logical_axes``).
      mesh: a Mesh, AbstractMesh or ``{axis: size}`` dict; None when the mesh
        is not known yet: every rule is then taken to apply and divide.

    Returns:
      A `Resolution`; its ``spec`` is what `resolve` returns.
    """
    if mesh is None:
      sizes = None
    else:
      sizes = mesh if isinstance(mesh, dict) else mesh_axes_lib.axis_sizes(mesh)
    unassigned = object()
    assigned: list[Any] = [unassigned] * len(shape)
    used: set[str] = set()
    tried: dict[int, list[tuple[MeshAxes, int]]] = {}
    size_one: dict[int, MeshAxes] = {}
    missing: list[str] = []
    for name, axes in self._rules:
      dims = [i for i, a in enumerate(logical_axes)
              if a == name and assigned[i] is unassigned]
      if not dims:
        continue
      if axes is None:
        for i in dims:
          assigned[i] = None
          tried.pop(i, None)  # an explicit fallback to replication: no warning
        continue
      axes_t = mesh_axes_lib.entry_axes(axes)
      absent = [] if sizes is None else [a for a in axes_t if a not in sizes]
      if absent:
        missing.extend(a for a in absent if a not in missing)
        continue
      # Without a mesh every rule applies (no size is known to be 1 or not to divide).
      ways = 0 if sizes is None else math.prod(sizes[a] for a in axes_t)
      if ways == 1:
        # Splits nothing on this mesh: leave the dimension to the name's next
        # rule, and name these axes in the spec only if no later rule takes it.
        for i in dims:
          size_one.setdefault(i, axes)
        continue
      for i in dims:
        if used.intersection(axes_t):
          break
        if ways and shape[i] % ways:
          tried.setdefault(i, []).append((axes, ways))
          continue
        assigned[i] = axes
        used.update(axes_t)
        tried.pop(i, None)  # sharded by a fallback rule: no warning
    for i, axes in size_one.items():
      axes_t = mesh_axes_lib.entry_axes(axes)
      if assigned[i] is unassigned and not used.intersection(axes_t):
        assigned[i] = axes
        used.update(axes_t)
    unknown: list[str] = []
    undivided = []
    for i, name in enumerate(logical_axes):
      if i in tried:
        undivided.append((i, name, shape[i], tuple(tried[i])))
      if assigned[i] is not unassigned:
        continue
      assigned[i] = None
      if name is not None and name not in self._names:
        if not self.allow_unknown and name not in unknown:
          unknown.append(name)
    return Resolution(PartitionSpec(*assigned), tuple(unknown), tuple(undivided),
                      tuple(missing))

  def resolve(self, logical_axes: Sequence[str | None], shape: Sequence[int],
              mesh: Any, *, path: Any = ()) -> PartitionSpec:
    """Resolves one array's logical axes to a PartitionSpec.

    Args:
      logical_axes: one logical name (or None) per dimension.
      shape: the array's shape.
      mesh: a Mesh, AbstractMesh or ``{axis: size}`` dict.
      path: the Variable's path, used in messages.

    Returns:
      A PartitionSpec with one entry per dimension.

    Raises:
      MetadataError: if ``logical_axes`` and ``shape`` differ in length.
      AxisRulesError: on unknown logical names or missing mesh axes.

    Warns:
      ShardingWarning: for dimensions replicated because no rule divided them.
    """
    check_rank(path, logical_axes, shape)
    res = self.resolve_detailed(logical_axes, shape, mesh)
    report_problems([(path, res)], self)
    return res.spec

  # --- printing and files ---------------------------------------------------
  def __repr__(self) -> str:
    flag = ", allow_unknown=True" if self.allow_unknown else ""
    return f"AxisRules({list(self._rules)!r}{flag})"

  def __str__(self) -> str:
    width = max((len(n) for n in self._names), default=0)
    head = f"AxisRules{_label(self.name)} ({len(self._rules)} rules"
    head += ", unknown names replicate)" if self.allow_unknown else ")"
    lines = [head] + [f"  {n:<{width}} -> {_rhs_str(a)}" for n, a in self._rules]
    return "\n".join(lines)

  def to_json(self) -> dict:
    """A JSON-able dict that `from_json` reads back."""
    rules = [[n, list(a) if isinstance(a, tuple) else a] for n, a in self._rules]
    out: dict[str, Any] = {"rules": rules}
    if self.name:
      out["name"] = self.name
    if self.allow_unknown:
      out["allow_unknown"] = True
    return out

  @classmethod
  def from_json(cls, data: Any, *, name: str | None = None) -> "AxisRules":
    """Builds rules from `to_json` output or a bare list of pairs."""
    if isinstance(data, Mapping):
      if "rules" not in data:
        raise errors.AxisRulesError(
            f"Axis-rules JSON{_label(name)} has no 'rules' key; expected "
            '{"rules": [["embed", "fsdp"], ...]}.', rules=name)
      return cls(data["rules"], allow_unknown=bool(data.get("allow_unknown", False)),
                 name=data.get("name", name))
    return cls(data, name=name)

  @classmethod
  def load(cls, name_or_path: str | os.PathLike) -> "AxisRules":
    """Loads a preset by name (see `presets`) or a JSON file by path.

    A bare name (no ``.json`` suffix, no directory) is a preset: a file of
    ``$SPMDNNX_RULES_DIR`` if that names a directory holding ``<name>.json``,
    else the rule set shipped as package data (``spmdnnx/spmd/presets``), so
    presets load from any installation, not only from a source checkout.

    >>> AxisRules.load("fsdp_tp").lookup("mlp")
    ('tensor', 'fsdp')

    Raises:
      AxisRulesError: if no such preset or file exists, or it is malformed.
    """
    text = os.fspath(name_or_path)
    is_path = text.endswith(".json") or os.sep in text or "/" in text
    if is_path:
      source: Any = pathlib.Path(text)
      stem = source.stem
      if not source.is_file():
        raise errors.AxisRulesError(
            f"No axis-rules file {text!r}. Shipped rule sets: "
            f"{', '.join(cls.presets())}; or pass the path of a JSON file.", path=text)
    else:
      stem = text
      source = _preset_files().get(text)
      if source is None:
        raise errors.AxisRulesError(
            f"No axis-rules file '{text}.json' among the presets (package data "
            f"or ${RULES_DIR_ENV}). Shipped rule sets: "
            f"{', '.join(cls.presets())}; or pass the path of a JSON file.", path=text)
    try:
      data = json.loads(source.read_text())
    except json.JSONDecodeError as e:
      raise errors.AxisRulesError(
          f"Axis-rules file {str(source)!r} is not valid JSON: {e}", path=str(source)) from None
    return cls.from_json(data, name=stem)

  @staticmethod
  def presets() -> tuple[str, ...]:
    """Names of the loadable presets: shipped ones plus ``$SPMDNNX_RULES_DIR``'s."""
    return tuple(sorted(_preset_files()))


def _rebuild_rules(rules: tuple, allow_unknown: bool, name: str | None) -> AxisRules:
  return AxisRules(rules, allow_unknown=allow_unknown, name=name)


def _label(name: str | None) -> str:
  return f" {name!r}" if name else ""


def as_rules(rules: Any) -> AxisRules:
  """Coerces a preset name, pair list, dict or AxisRules into `AxisRules`."""
  if isinstance(rules, AxisRules):
    return rules
  if isinstance(rules, (str, os.PathLike)):
    return AxisRules.load(rules)
  return AxisRules(rules)


def check_rank(path: Any, logical_axes: Sequence[Any], shape: Sequence[int]) -> None:
  """Raises MetadataError if ``logical_axes`` does not have one entry per dim."""
  if len(logical_axes) != len(shape):
    raise errors.MetadataError(
        f"{errors.path_str(path)}: logical_axes {tuple(logical_axes)!r} has "
        f"{len(logical_axes)} entries but the array has shape {tuple(shape)} "
        f"({len(shape)} dimensions); give one name (or None) per dimension.",
        paths=[errors.path_str(path)], shapes=[tuple(shape)], axes=[tuple(logical_axes)])


def report_problems(results: Sequence[tuple[Any, Resolution]], rules: AxisRules) -> None:
  """Raises or warns once for all problems in many resolutions.

  Raises:
    AxisRulesError: listing every path with an unknown logical name, or every
      missing mesh axis.

  Warns:
    ShardingWarning: listing every dimension replicated because no rule's
      mesh axes divided it.
  """
  missing = sorted({m for _, r in results for m in r.missing})
  if missing:
    needing = [errors.path_str(p) for p, r in results if r.missing]
    raise errors.AxisRulesError(
        f"Axis rules{_label(rules.name)} name mesh axes {missing} that the mesh "
        f"lacks (needed by {errors.format_paths(needing)}). "
        "Add them to the mesh (size 1 is fine) or override those rules.",
        rules=rules.name, axes=missing, paths=needing)
  unknown = [f"{errors.path_str(p)} {list(r.unknown)}" for p, r in results if r.unknown]
  if unknown:
    names = sorted({n for _, r in results for n in r.unknown})
    raise errors.AxisRulesError(
        f"No axis rule for logical name(s) {names}; used by: "
        f"{errors.format_paths(unknown)}. Add a rule such as "
        f"({names[0]!r}, None) to replicate it, or create the rules with "
        "allow_unknown=True.", rules=rules.name, axes=names,
        paths=[errors.path_str(p) for p, r in results if r.unknown])
  undivided = []
  for p, r in results:
    for dim, name, size, tried in r.undivided:
      opts = ", ".join(f"{_rhs_str(a)}={w}" for a, w in tried)
      undivided.append(f"{errors.path_str(p)} dim {dim} ({name!r}, size {size}; tried {opts})")
  if undivided:
    warnings.warn(errors.ShardingWarning(
        f"{len(undivided)} dimension(s) stay unsplit (replicated) because no axis "
        f"rule divides them: "
        f"{errors.format_paths(undivided)}. Pick sizes divisible by the mesh axes, "
        "or add a fallback rule for the logical name."), stacklevel=3)
