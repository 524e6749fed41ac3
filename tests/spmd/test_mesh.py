"""Tests for spmdnnx.spmd._mesh: MeshConfig validation, make_mesh, plan_abstract."""

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, Mesh

from spmdnnx import errors
from spmdnnx.spmd._mesh import AXES, MeshConfig, make_mesh, plan_abstract


def test_make_mesh_keeps_every_axis_and_is_auto():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  assert isinstance(mesh, Mesh)
  assert mesh.axis_names == AXES
  assert dict(mesh.shape) == {"data": 1, "stage": 1, "fsdp": 4, "expert": 1, "sequence": 1,
                              "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * len(AXES)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_fill_remainder():
  assert MeshConfig(fsdp=-1, tensor=2).mesh_shape(8)["fsdp"] == 4
  assert make_mesh(MeshConfig(data=-1)).shape["data"] == 8


def test_explicit_axis_types_and_device_subset():
  mesh = make_mesh(MeshConfig(fsdp=2), devices=jax.devices()[:2], axis_types="explicit")
  assert mesh.axis_types == (AxisType.Explicit,) * len(AXES)
  assert mesh.devices.size == 2
  one = make_mesh(MeshConfig(), devices=jax.devices()[:1])
  assert one.devices.size == 1 and all(s == 1 for s in one.shape.values())


def test_product_mismatch_names_product_count_and_axis():
  with pytest.raises(errors.MeshError,
                     match=r"MeshConfig ici: degrees multiply to 16 \(fsdp=4 x tensor=4\) but "
                           r"there are 8 devices; offending axis: fsdp=4, tensor=4"):
    make_mesh(MeshConfig(fsdp=4, tensor=4))
  with pytest.raises(errors.MeshError, match=r"degrees multiply to 6 \(fsdp=2 x tensor=3\) "
                                             r"but there are 8 devices; offending axis: "
                                             r"tensor=3"):
    make_mesh(MeshConfig(fsdp=2, tensor=3))


def test_fill_that_does_not_divide():
  with pytest.raises(errors.MeshError,
                     match=r"fixed degrees multiply to 3 \(tensor=3\), which does not divide "
                           r"the 8 devices, so fsdp=-1 cannot fill"):
    make_mesh(MeshConfig(fsdp=-1, tensor=3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=2), r"MeshConfig ici: unknown parallelism axis 'model'; valid axes are data, "
                    r"stage, fsdp, expert, sequence, tensor"),
    (dict(fsdp=0), r"MeshConfig ici: invalid degree fsdp=0"),
    (dict(fsdp=1.5), r"invalid degree fsdp=1.5"),
    (dict(fsdp=True), r"invalid degree fsdp=True"),
    (dict(fsdp=-1, data=-1), r"'fsdp' and 'data' are both -1; at most one axis per level"),
    (dict(dcn=dict(tp=2)), r"MeshConfig dcn: unknown parallelism axis 'tp'"),
    (dict(ici=dict(fsdp=2), tensor=2), r"give either ici=\{...\} or degrees as keywords "
                                       r"\(tensor\), not both"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(errors.MeshError, match=match):
    MeshConfig(**kwargs)


def test_dcn_degrees_need_that_many_slices():
  config = MeshConfig(ici=dict(fsdp=-1), dcn=dict(data=2))
  with pytest.raises(errors.MeshError,
                     match=r"MeshConfig dcn: degrees multiply to 2 \(data=2\) but there are 1 "
                           r"slices \(processes\); offending axis: data=2"):
    make_mesh(config)


def test_bad_arguments():
  with pytest.raises(errors.MeshError, match=r"make_mesh expects a MeshConfig, got dict"):
    make_mesh({"fsdp": 8})
  with pytest.raises(errors.MeshError, match=r"Unknown axis_types 'manual'"):
    make_mesh(MeshConfig(fsdp=8), axis_types="manual")
  with pytest.raises(errors.MeshError, match=r"8 devices cannot be split evenly into 3 slices"):
    MeshConfig(fsdp=-1).resolve(8, 3)


def test_plan_abstract_512_devices():
  mesh = plan_abstract(MeshConfig(fsdp=-1, tensor=8, sequence=2), num_devices=512)
  assert isinstance(mesh, AbstractMesh)
  assert dict(mesh.shape) == {"data": 1, "stage": 1, "fsdp": 32, "expert": 1, "sequence": 2,
                              "tensor": 8}


def test_plan_abstract_two_levels():
  config = MeshConfig(ici=dict(fsdp=-1, tensor=8), dcn=dict(data=-1))
  assert config.multi_level
  ici, dcn = config.resolve(512, num_slices=2)
  assert dict(zip(AXES, ici))["fsdp"] == 32 and dict(zip(AXES, dcn))["data"] == 2
  mesh = plan_abstract(config, 512, num_slices=2)
  assert mesh.shape["data"] == 2 and mesh.shape["fsdp"] == 32 and mesh.size == 512
  with pytest.raises(errors.MeshError, match=r"MeshConfig ici: degrees multiply to 8 "
                                             r"\(tensor=8\) but there are 128 devices per slice"):
    MeshConfig(ici=dict(tensor=8), dcn=dict(data=4)).resolve(512, num_slices=4)


def test_dict_round_trip_and_repr():
  config = MeshConfig(ici=dict(fsdp=-1, tensor=2), dcn=dict(data=2))
  assert MeshConfig.from_dict(config.to_dict()) == config
  assert repr(config) == "MeshConfig(ici={'fsdp': -1, 'tensor': 2}, dcn={'data': 2})"
  assert repr(MeshConfig(fsdp=4)) == "MeshConfig(fsdp=4)"
  assert MeshConfig.from_dict({"fsdp": 4}) == MeshConfig(fsdp=4)
  assert hash(MeshConfig(fsdp=4)) == hash(MeshConfig(ici={"fsdp": 4}))
  with pytest.raises(errors.MeshError, match=r"unexpected keys \['tensor'\] next to ici/dcn"):
    MeshConfig.from_dict({"ici": {}, "tensor": 2})
