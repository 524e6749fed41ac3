"""An ordinary Flax-NNX-style program runs with only the import changed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spmdnnx as nnx


class CNN(nnx.Module):
  """A small classifier in the usual Flax NNX style."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
    self.linear = nnx.Linear(8 * 2 * 2, 3, rngs=rngs)
    self.count = nnx.Variable(jnp.array(0))

  def __call__(self, x):
    self.count += 1
    x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), window_shape=(2, 2), strides=(2, 2))
    x = self.dropout(x)
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
    return self.linear(x.reshape(x.shape[0], -1))


def loss_fn(model, batch):
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


@nnx.jit
def train_step(model, optimizer, batch):
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, batch):
  loss, logits = loss_fn(model, batch)
  return loss, (logits.argmax(-1) == batch["label"]).mean()


def make_data(n=24, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, size=n)
  images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) * 0.3
  for i, label in enumerate(labels):   # each class lights up a different band
    images[i, 2 * label:2 * label + 3, :, 0] += 1.0
  return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def test_flax_style_training_program():
  model = CNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  batch = make_data()

  model.train()
  losses = [float(train_step(model, optimizer, batch)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]
  assert int(optimizer.step.value) == 30
  assert int(model.count.value) == 30
  # BatchNorm statistics moved during training.
  assert float(jnp.abs(model.bn1.mean.value).sum()) > 0

  model.eval()
  loss1, acc = eval_step(model, batch)
  loss2, _ = eval_step(model, batch)
  assert float(loss1) == float(loss2)          # deterministic in eval mode
  assert float(acc) > 0.8

  # The functional API round trip gives the same predictions.
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  np.testing.assert_allclose(copy(batch["image"]), model(batch["image"]), rtol=1e-6)
  params = nnx.state(model, nnx.Param)
  assert all(isinstance(v, nnx.Param) for _, v in params.flat_state())
  nnx.display(graphdef)  # prints; must not fail
